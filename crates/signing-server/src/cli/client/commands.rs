//! The client's commands: sign a server-side path (the original protocol), upload local
//! files, list keys, verify a signature here.

use std::io::IsTerminal as _;
use std::path::Path;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::args::{Conn, Sign, Verify};
use super::conn::{Failure, REJECTED, Target, open_tls};
use super::http::Api;
use super::original::{self, Reply};
use crate::fields::{Fields, python_json};

/// Uploads larger than this get a progress bar (when stderr is a terminal).
const PROGRESS_THRESHOLD: u64 = 1 << 20;
/// Largest original-protocol answer we read.
const MAX_ORIGINAL_ANSWER: usize = 64 << 20;

/// The path to send: absolute as given, relative joined to the current directory.
fn server_path(path: Option<&Path>) -> Result<String, Failure> {
    if let Some(given) = path {
        // With args_conflicts_with_subcommands, `--host h keys` makes "keys" the PATH.
        if matches!(given.to_str(), Some("keys" | "verify")) {
            return Err(Failure::Usage(format!(
                "{0:?} would be sent as a path: put subcommands first (`signing-client {0} --host ...`), or write ./{0} for a server directory of that name",
                given.display().to_string()
            )));
        }
    }
    let absolute = match path {
        Some(p) if p.is_absolute() => p.to_owned(),
        _ => {
            let cwd = std::env::current_dir()
                .map_err(|e| Failure::Io(format!("the current directory: {e}")))?;
            path.map_or(cwd.clone(), |p| cwd.join(p))
        }
    };
    let text = absolute
        .to_str()
        .ok_or_else(|| Failure::Input(format!("{} is not UTF-8", absolute.display())))?;
    if text.contains(['\n', '\r', '\0']) {
        return Err(Failure::Input(format!(
            "{text:?} holds a line break or NUL"
        )));
    }
    Ok(text.to_owned())
}

#[allow(clippy::print_stdout)] // the command's result goes to stdout
pub(crate) async fn run_original(conn: &Conn, path: Option<&Path>) -> Result<u8, Failure> {
    let path = server_path(path)?;
    let target = Target::new(conn, Vec::new())?;
    let mut stream = open_tls(&target).await?;
    let idle = target.timeout;
    let net = |e: std::io::Error| Failure::Connect(tls_hint(&e));
    // One write, as the original; the newline tells the server the path is complete.
    tokio::time::timeout(idle, async {
        stream.write_all(format!("{path}\n").as_bytes()).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| Failure::Connect("sending the path timed out".into()))?
    .map_err(net)?;
    let mut data = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(idle, stream.read(&mut chunk))
            .await
            .map_err(|_| {
                Failure::Connect(format!(
                    "no answer from the server for {}s (it signs everything before it answers; raise --timeout)",
                    idle.as_secs()
                ))
            })?;
        match read {
            Ok(0) => break,
            Ok(n) => {
                data.extend_from_slice(&chunk[..n]);
                if data.len() > MAX_ORIGINAL_ANSWER {
                    return Err(Failure::Protocol(format!(
                        "the answer is over {MAX_ORIGINAL_ANSWER} bytes"
                    )));
                }
            }
            // The server drops the connection after a refusal of an unreadable request.
            Err(err)
                if err.kind() == std::io::ErrorKind::UnexpectedEof
                    && data.starts_with(b"Refused: ") =>
            {
                break;
            }
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Failure::Connect(
                    "the server closed the connection before finishing its answer".into(),
                ));
            }
            Err(err) => return Err(net(err)),
        }
    }
    match original::parse(&data).map_err(Failure::Protocol)? {
        Reply::Refused(reason) => Err(if original::is_permission(&reason) {
            Failure::Refused(format!("refused: {reason}"))
        } else {
            Failure::Rejected(format!("refused: {reason}"))
        }),
        Reply::Answer(answer) => {
            if conn.json {
                println!(
                    "{}",
                    serde_json::to_string(&answer).map_err(|e| Failure::Protocol(e.to_string()))?
                );
            } else {
                print!("{}", original::render(&answer, &conn.host));
            }
            let failed: Vec<&str> = answer
                .files
                .0
                .iter()
                .filter(|(_, e)| matches!(e, original::Entry::Failed { .. }))
                .map(|(name, _)| name.as_str())
                .collect();
            if failed.is_empty() {
                Ok(0)
            } else {
                eprintln!("signing-client: not signed: {}", failed.join(", "));
                Ok(REJECTED)
            }
        }
    }
}

/// An I/O error from the TLS stream, with a hint when the server sent an alert (with TLS 1.3
/// a refused client certificate shows up on the first read, not in the handshake).
fn tls_hint(err: &std::io::Error) -> String {
    let alert = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)));
    if alert {
        format!(
            "the server ended the TLS session: {err} (is --cert issued by the CA the server trusts?)"
        )
    } else {
        err.to_string()
    }
}

fn progress_bar(size: u64, name: &str) -> Option<indicatif::ProgressBar> {
    if size <= PROGRESS_THRESHOLD || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(name.to_owned());
    Some(bar)
}

/// What `POST /v1/sign` answers.
#[derive(Debug, serde::Deserialize)]
struct Uploaded {
    name: String,
    #[serde(flatten)]
    fields: Fields,
}

#[allow(clippy::print_stdout)] // the command's result goes to stdout
pub(crate) async fn run_upload(conn: &Conn, sign: &Sign) -> Result<u8, Failure> {
    // Every file must be there before anything is sent.
    let mut files = Vec::with_capacity(sign.upload.len());
    for path in &sign.upload {
        let meta = std::fs::metadata(path)
            .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(Failure::Input(format!("{} is not a file", path.display())));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Failure::Input(format!("{} has no file name", path.display())))?;
        files.push((path, name, meta.len()));
    }
    let target = Target::new(conn, vec![crate::server::ALPN_HTTP.to_vec()])?;
    let mut api = Api::connect(target).await?;
    let mut code = 0;
    for (path, name, size) in files {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("name", &name);
        for (key, value) in [
            ("package", &sign.package),
            ("fileset", &sign.fileset),
            ("vrmf", &sign.vrmf),
            ("ftype", &sign.ftype),
        ] {
            if let Some(value) = value {
                query.append_pair(key, value);
            }
        }
        let uri = format!("/v1/sign?{}", query.finish());
        let bar = progress_bar(size, &name);
        let answer = api.post_file(&uri, path, size, bar.clone()).await;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let answer = answer?;
        if answer.status != 200 {
            let failure = answer.failure(&name);
            if matches!(failure, Failure::Refused(_)) {
                return Err(failure);
            }
            eprintln!("signing-client: {failure}");
            code = REJECTED;
            continue;
        }
        if conn.json {
            println!("{}", answer.json()?);
        } else {
            let uploaded: Uploaded = serde_json::from_slice(&answer.body)
                .map_err(|e| Failure::Protocol(format!("the answer for {name}: {e}")))?;
            println!("{}: {}", uploaded.name, python_json(&uploaded.fields));
        }
    }
    Ok(code)
}

#[allow(clippy::print_stdout)] // the command's result goes to stdout
pub(crate) async fn run_keys(conn: &Conn) -> Result<u8, Failure> {
    let target = Target::new(conn, vec![crate::server::ALPN_HTTP.to_vec()])?;
    let mut api = Api::connect(target).await?;
    let answer = api.get("/v1/keys").await?;
    if answer.status != 200 {
        return Err(answer.failure("listing keys"));
    }
    let value = answer.json()?;
    if conn.json {
        println!("{value}");
        return Ok(0);
    }
    let mine = value.get("key").and_then(|k| k.as_str());
    let keys = value
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| Failure::Protocol("the answer has no \"keys\"".into()))?;
    let text = |key: &serde_json::Value, field: &str| {
        key.get(field)
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_owned()
    };
    let rows: Vec<[String; 3]> = keys
        .iter()
        .map(|k| [text(k, "name"), text(k, "keyid"), text(k, "algorithm")])
        .collect();
    let width = |i: usize, title: &str| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1) = (width(0, "NAME"), width(1, "KEYID"));
    println!("  {:w0$}  {:w1$}  ALGORITHM", "NAME", "KEYID");
    for row in &rows {
        let mark = if Some(row[0].as_str()) == mine {
            '*'
        } else {
            ' '
        };
        println!("{mark} {:w0$}  {:w1$}  {}", row[0], row[1], row[2]);
    }
    Ok(0)
}

#[allow(clippy::print_stdout)] // the command's result goes to stdout
pub(crate) async fn run_verify(conn: &Conn, verify: &Verify) -> Result<u8, Failure> {
    let encoded = verify
        .signature
        .as_deref()
        .or(verify.signature_arg.as_deref())
        .unwrap_or_default();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| Failure::Input(format!("the signature is not base64: {e}")))?;
    let file = std::fs::File::open(&verify.file)
        .map_err(|e| Failure::Input(format!("{}: {e}", verify.file.display())))?;
    let pem = match (&verify.public_key, &verify.keyid) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?,
        (None, Some(keyid)) => fetch_key(conn, keyid).await?,
        (None, None) => return Err(Failure::Usage("--public-key or --keyid is required".into())),
    };
    let key = crate::ed448::parse_public_pem(&pem)
        .map_err(|e| Failure::Input(format!("the public key: {e}")))?;
    if let Some(keyid) = &verify.keyid {
        let actual = crate::ed448::keyid(&key);
        if verify.public_key.is_none() && &actual != keyid {
            return Err(Failure::Protocol(format!(
                "the server's key for id {keyid} has id {actual}"
            )));
        }
    }
    let path = verify.file.clone();
    let valid = tokio::task::spawn_blocking(move || {
        crate::ed448::verify_stream(&key, &signature, std::io::BufReader::new(file))
    })
    .await
    .map_err(|e| Failure::Io(e.to_string()))?
    .map_err(|e| Failure::Io(format!("{}: {e}", path.display())))?;
    if conn.json {
        println!("{}", serde_json::json!({ "valid": valid }));
    } else {
        println!("Signature {}", if valid { "OK" } else { "BAD" });
    }
    Ok(if valid { 0 } else { REJECTED })
}

async fn fetch_key(conn: &Conn, keyid: &str) -> Result<String, Failure> {
    if keyid.is_empty()
        || !keyid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Failure::Input(format!("{keyid:?} is not a key id")));
    }
    let target = Target::new(conn, vec![crate::server::ALPN_HTTP.to_vec()])?;
    let mut api = Api::connect(target).await?;
    let answer = api.get(&format!("/v1/keys/{keyid}")).await?;
    match answer.status {
        200 => Ok(String::from_utf8_lossy(&answer.body).into_owned()),
        404 => Err(Failure::Input(format!(
            "the server has no public key with id {keyid}"
        ))),
        _ => Err(answer.failure("fetching the key")),
    }
}

#[cfg(test)]
mod tests {
    use common::cli::Report as _;

    use super::*;

    #[test]
    fn server_paths() {
        assert_eq!(
            server_path(Some(Path::new("/export/pkgs"))).unwrap(),
            "/export/pkgs"
        );
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            server_path(Some(Path::new("sub/a.bff"))).unwrap(),
            cwd.join("sub/a.bff").to_str().unwrap()
        );
        assert_eq!(server_path(None).unwrap(), cwd.to_str().unwrap());
        // A subcommand after a global flag lands here as a path: a usage error (64).
        let keys = server_path(Some(Path::new("keys"))).unwrap_err();
        assert!(matches!(keys, Failure::Usage(_)), "{keys}");
        assert_eq!(keys.exit_code(), common::daemon::exit::USAGE);
        assert!(server_path(Some(Path::new("./keys"))).is_ok());
        // The newline ends the path on the wire.
        let broken = server_path(Some(Path::new("/p/a\nb"))).unwrap_err();
        assert_eq!(broken.exit_code(), common::daemon::exit::DATAERR);
    }
}
