//! broker-cli: the user's client of the broker. Registers, lists, loads, verifies and deletes
//! jobs over the daemon's socket (or its HTTPS API), runs itself on another host over ssh for
//! `--host` as the original client did, and builds the tunnel (`connect`): a Unix socket in a
//! private directory (`curl --unix-socket`), or a TCP port only the user's own processes get
//! through (a browser on the laptop opens `http://127.0.0.1:PORT/`).
//!
//! The tunnel lives in [`crate::tunnel`]; this module is flags ([`args`]), output ([`show`],
//! [`out_dir`]) and exit codes ([`failure`]).

mod args;
mod ask;
mod connect;
mod failure;
mod out_dir;
mod show;
mod verify;

pub use args::{Args, rewrite_aliases};

use args::{Command, Conn, Connect, JobArg, Load, Save, Verify};
use ask::{check_job_id, client, load_job, remote};
use connect::run_connect;
use show::{job_table, print_json, show_job};
use verify::run_verify;

use crate::api::{JobList, SaveRequest};
use crate::cli::failure::Failure;
use crate::tunnel::Ssh;

/// Runs one command; its exit code ([`failure`] names them), or why it failed.
///
/// Sets up tracing (warnings by default) and the rustls provider first.
///
/// # Errors
/// A usage error (64), no such job (65), an unreachable broker (69), local I/O (66, 74), a
/// senseless answer (76), a refusal (77): the `--help` text lists them.
pub async fn run(args: Args) -> Result<u8, Failure> {
    common::daemon::init_tracing(&args.log, "warn")
        .map_err(|err| Failure::usage(format!("{err:#}")))?;
    common::tls::install_default_provider();
    execute(&args).await
}

#[allow(clippy::print_stdout)] // delete, whoami, ca: the result goes to stdout
async fn execute(args: &Args) -> Result<u8, Failure> {
    let conn = &args.conn;
    // Everything that can be checked without contacting anybody is checked first.
    let job = match &args.command {
        Command::Load(Load { job, .. })
        | Command::Verify(Verify { job, .. })
        | Command::Delete(JobArg { job })
        | Command::Connect(Connect { job, .. }) => Some(job.as_str()),
        Command::Query | Command::Save(_) | Command::Whoami | Command::Ca => None,
    };
    if let Some(job) = job {
        check_job_id(job)?;
    }
    if conn.host.is_some()
        && !matches!(
            args.command,
            Command::Query | Command::Load(_) | Command::Connect(_)
        )
    {
        return Err(Failure::usage(
            "--host works with query, load and connect; run the others on that host",
        ));
    }
    let ssh = match &conn.host {
        Some(host) => Some(Ssh::new(
            &conn.ssh,
            conn.ssh_options.clone(),
            host.as_str(),
        )?),
        None => None,
    };
    match &args.command {
        Command::Query => run_query(conn, ssh.as_ref()).await,
        Command::Load(load) => {
            let job = load_job(conn, ssh.as_ref(), &load.job).await?;
            show_job(conn, &job, &load.material)
        }
        Command::Save(save) => run_save(conn, save).await,
        Command::Verify(verify) => run_verify(conn, verify).await,
        Command::Delete(JobArg { job }) => {
            client(conn)?.delete(job).await?;
            if conn.json {
                println!("{}", serde_json::json!({ "id": job, "deleted": true }));
            } else {
                println!("deleted {job}");
            }
            Ok(0)
        }
        Command::Whoami => {
            let me = client(conn)?.whoami().await?;
            if conn.json {
                print_json(&me)?;
            } else {
                println!("{} (via {}) on {}", me.user, me.via, me.host);
            }
            Ok(0)
        }
        Command::Ca => {
            let pem = client(conn)?.ca_pem().await?;
            if conn.json {
                println!("{}", serde_json::json!({ "ca": pem }));
            } else {
                print!("{pem}");
                if !pem.ends_with('\n') {
                    println!();
                }
            }
            Ok(0)
        }
        Command::Connect(connect) => run_connect(conn, ssh.as_ref(), connect).await,
    }
}

#[allow(clippy::print_stdout)] // the job list goes to stdout
async fn run_query(conn: &Conn, ssh: Option<&Ssh>) -> Result<u8, Failure> {
    let jobs = match ssh {
        Some(ssh) => remote::<JobList>(conn, ssh, &["query"]).await?.jobs,
        None => client(conn)?.query().await?,
    };
    if conn.json {
        print_json(&JobList { jobs })?;
        return Ok(0);
    }
    if jobs.is_empty() {
        println!("no jobs");
        return Ok(0);
    }
    print!("{}", job_table(&jobs));
    Ok(0)
}

async fn run_save(conn: &Conn, save: &Save) -> Result<u8, Failure> {
    if let Some(label) = &save.label {
        if label.chars().count() > 200 {
            return Err(Failure::usage("--label is longer than 200 characters"));
        }
    }
    let request = SaveRequest {
        job_type: Some(save.job_type),
        ttl_secs: save.ttl.map(|t| t.as_secs().max(1)),
        label: save.label.clone(),
    };
    let job = client(conn)?.save(&request).await?;
    show_job(conn, &job, &save.material)
}
