//! broker-cli's output: the query table, a job's facts, JSON.

use common::daemon::exit;

use super::args::{Conn, Material};
use super::out_dir::write_material;
use crate::api::{Job, JobSummary, JobType};
use crate::cli::failure::Failure;

#[allow(clippy::print_stdout)] // a CLI: results go to stdout
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    let text =
        serde_json::to_string(value).map_err(|e| Failure::new(exit::SOFTWARE, e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// The query table: one line per job, columns padded.
pub(crate) fn job_table(jobs: &[JobSummary]) -> String {
    let header = ["ID", "TYPE", "HOST", "PORT", "STATUS", "EXPIRES", "LABEL"];
    let rows: Vec<[String; 7]> = jobs
        .iter()
        .map(|j| {
            [
                j.id.clone(),
                j.job_type.to_string(),
                j.host.clone(),
                j.port.to_string(),
                j.status.clone(),
                j.expires.clone(),
                j.label.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut text = line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        text.push_str(&line(&cells));
    }
    text
}

/// The non-secret facts of a job, one `name  value` line each.
fn facts(job: &JobSummary) -> String {
    let mut lines = vec![
        ("job", job.id.clone()),
        ("type", job.job_type.to_string()),
        ("owner", job.owner.clone()),
        ("host", job.host.clone()),
        ("port", job.port.to_string()),
        ("status", job.status.clone()),
        ("created", job.created.clone()),
        ("expires", job.expires.clone()),
    ];
    if let Some(label) = &job.label {
        lines.push(("label", label.clone()));
    }
    lines
        .iter()
        .map(|(name, value)| format!("{name:<9}{value}\n"))
        .collect()
}

/// load and save: the job as JSON, or its facts plus where the secret is.
#[allow(clippy::print_stdout)] // a CLI: results go to stdout
pub(crate) fn show_job(conn: &Conn, job: &Job, material: &Material) -> Result<u8, Failure> {
    let written = match &material.out_dir {
        Some(dir) => write_material(dir, job)?,
        None => Vec::new(),
    };
    if conn.json {
        print_json(job)?;
        return Ok(0);
    }
    let mut text = facts(&job.summary);
    let what = match job.summary.job_type {
        JobType::Ssh => "secret",
        JobType::Ssl => "certs",
    };
    if !written.is_empty() {
        let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        text.push_str(&format!("{what:<9}{}\n", names.join(" ")));
    } else if !material.show_secret {
        text.push_str(&format!(
            "{what:<9}not shown: --out-dir DIR writes it (mode 0600), --show-secret or --json prints it\n"
        ));
    }
    if material.show_secret {
        if let Some(secret) = &job.secret {
            text.push_str(&format!("{:<9}{secret}\n", "secret"));
        }
        if let Some(tls) = &job.tls {
            for (name, pem) in [
                ("certificate", &tls.cert),
                ("key", &tls.key),
                ("client certificate", &tls.client_cert),
                ("client key", &tls.client_key),
                ("CA certificate", &tls.ca),
            ] {
                text.push_str(&format!("\n# {name}\n{}", pem.trim_end()));
                text.push('\n');
            }
        }
    }
    print!("{text}");
    Ok(0)
}
