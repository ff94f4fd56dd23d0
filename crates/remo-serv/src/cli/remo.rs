//! `remo`: the remo-serv client's commands (`info`, `exec`, `get`, `put`, `shell`) over
//! [`crate::client`], with the exit statuses its help lists.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use common::cli::Report;
use common::daemon::exit;

use crate::client::{Client, ClientConfig, ClientError, plain_info};
use crate::keys::{KeyError, PrivateKey, PublicKey};

/// Client for remo-serv (and the original remo_serv 0.6.0 server).
///
/// Logs in with your Ed448 key, checks the server's signature with its public key, then runs
/// one command. Private keys may be passphrase-encrypted: the passphrase comes from
/// --passphrase-file, else REMO_PASSPHRASE, else a prompt.
///
/// Exit codes: `exec` exits with the remote command's status; otherwise 0 done,
/// 64 bad flags or no user name, 66 remote file (or local key file) missing, 65 request
/// refused as invalid (4xx),
/// 69 server unreachable or failing (5xx), 74 local I/O error (a missing local file for
/// `put` too), 76 protocol error,
/// 77 login refused or permission denied.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  remo http://127.0.0.1:8080 info\n  remo --user alice http://host:8080 exec -- ls -l /tmp\n  remo http://host:8080 get logs/app.log ./app.log\n  remo http://host:8080 put ./build.tar.gz uploads/build.tar.gz\n  remo http://host:8080 shell"
)]
pub struct Args {
    /// Server public key (PEM).
    #[arg(
        long,
        short = 's',
        visible_alias = "server",
        default_value = "remo_serv.pem",
        value_name = "PEM"
    )]
    server_key: PathBuf,
    /// User name [default: $USER].
    #[arg(long, short = 'u', env = "REMO_USER")]
    user: Option<String>,
    /// Private key (PEM) [default: USER_key.pem].
    #[arg(long, short = 'k', value_name = "PEM")]
    key: Option<PathBuf>,
    /// File whose first line is the key's passphrase.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// CA bundle for https:// URLs [default: the system bundle].
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Upload as one token (needed for the stock original server; holds the file in memory).
    #[arg(long)]
    single_token_upload: bool,
    /// Seconds to wait for the connection and for each answer to start.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    timeout: u64,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    /// Server URL: http://HOST:PORT or https://HOST:PORT, optionally with a path prefix.
    url: url::Url,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print the server's banner (logs in first, so it also checks your keys).
    Info {
        /// Do not log in: the plain pre-login banner.
        #[arg(long)]
        anonymous: bool,
    },
    /// Run a command (no shell: split with shell-word rules) and print its output.
    ///
    /// stdout and stderr arrive merged. remo exits with the command's exit status.
    Exec {
        /// Send this file as the command's standard input (`-`: remo's own stdin).
        #[arg(long, value_name = "FILE")]
        stdin: Option<PathBuf>,
        /// The command line.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Download REMOTE to LOCAL (default: REMOTE's file name).
    Get {
        /// Remote file (relative to the server's working directory).
        remote: String,
        /// Local file.
        local: Option<PathBuf>,
    },
    /// Upload LOCAL to REMOTE (default: LOCAL's file name). The server replaces the remote
    /// file only when the whole upload arrived intact.
    Put {
        /// Local file.
        local: PathBuf,
        /// Remote file.
        remote: Option<String>,
    },
    /// Interactive session: exec, iexec, idata, iend, get, put, help, quit.
    Shell,
}

#[derive(Debug, thiserror::Error)]
/// Why `remo` stops; its exit status is in the `Report` impl.
pub enum Failure {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Report for Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Client(ClientError::Connect { .. }) => exit::UNAVAILABLE,
            Self::Client(ClientError::LoginRefused(_) | ClientError::ServerKey) => exit::NOPERM,
            Self::Client(ClientError::Status { status, .. }) => match status {
                403 => exit::NOPERM,
                404 => exit::NOINPUT,
                400..=499 => exit::DATAERR,
                _ => exit::UNAVAILABLE,
            },
            Self::Client(ClientError::Protocol(_)) => 76,
            Self::Client(ClientError::Io(_)) | Self::Io(_) => exit::IOERR,
            Self::Key(KeyError::Io { .. }) => exit::NOINPUT,
            Self::Key(_) => exit::DATAERR,
            Self::Usage(_) => exit::USAGE,
        }
    }
}

fn passphrase(args: &Args, key_path: &Path) -> Result<Option<Vec<u8>>, Failure> {
    if let Some(file) = &args.passphrase_file {
        let text = std::fs::read_to_string(file)?;
        return Ok(Some(
            text.lines().next().unwrap_or("").trim().as_bytes().to_vec(),
        ));
    }
    if let Ok(value) = std::env::var("REMO_PASSPHRASE") {
        return Ok(Some(value.trim().as_bytes().to_vec()));
    }
    let prompt = format!("Passphrase for {}: ", key_path.display());
    let answer = rpassword::prompt_password(prompt)?;
    Ok(Some(answer.trim().as_bytes().to_vec()))
}

fn load_key(args: &Args, user: &str) -> Result<PrivateKey, Failure> {
    let path = args
        .key
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{user}_key.pem")));
    let text = std::fs::read_to_string(&path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let secret = if PrivateKey::is_encrypted_pem(&text) {
        passphrase(args, &path)?
    } else {
        None
    };
    Ok(PrivateKey::from_pem(&text, secret.as_deref())?)
}

fn progress_bar(total: Option<u64>, json: bool) -> Option<indicatif::ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match total {
        Some(total) => indicatif::ProgressBar::new(total),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// Logs in, runs the command `args` names, logs out; `exec` answers the remote command's exit
/// status.
///
/// # Errors
/// The [`Failure`] that stopped the client, with its exit status.
#[allow(clippy::print_stdout)] // a CLI: results go to stdout
pub async fn run(args: Args) -> Result<u8, Failure> {
    let user = args.user.clone().or_else(|| std::env::var("USER").ok());
    let anonymous = matches!(args.command, Command::Info { anonymous: true });
    let user = match user {
        Some(user) => user,
        None if anonymous => String::new(),
        None => return Err(Failure::Usage("no user name: pass --user".into())),
    };
    let config = ClientConfig {
        url: args.url.clone(),
        user: user.clone(),
        ca: args.ca.clone(),
        single_token_upload: args.single_token_upload,
        timeout: Duration::from_secs(args.timeout),
    };
    if let Command::Info { anonymous: true } = args.command {
        let text = plain_info(&config).await?;
        print_text(args.json, "info", &text);
        return Ok(0);
    }
    let key = load_key(&args, &user)?;
    let server_key = PublicKey::read(&args.server_key)?;
    let mut client = Client::login(config, key, server_key).await?;
    let result = run_command(&args, &mut client).await;
    // Log out whatever happened, so the session does not linger until its idle timeout.
    let _ = client.logout().await;
    result
}

#[allow(clippy::print_stdout)] // a CLI: results go to stdout
async fn run_command(args: &Args, client: &mut Client) -> Result<u8, Failure> {
    let code = match &args.command {
        Command::Info { .. } => {
            let text = client.info().await?;
            print_text(args.json, "info", &text);
            0
        }
        Command::Exec { stdin, command } => {
            let input = match stdin.as_deref() {
                None => Vec::new(),
                Some(path) if path == Path::new("-") => {
                    let mut data = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)?;
                    data
                }
                Some(path) => std::fs::read(path)?,
            };
            let line = if command.len() == 1 {
                command[0].clone()
            } else {
                shell_words::join(command)
            };
            let result = client.exec(&line, &input).await?;
            let code = result.exit_status.unwrap_or(0);
            if args.json {
                let value = serde_json::json!({
                    "output": String::from_utf8_lossy(&result.output),
                    "exit_status": result.exit_status,
                    "timed_out": result.timed_out,
                });
                println!("{value}");
            } else {
                std::io::stdout().write_all(&result.output)?;
                if result.timed_out {
                    eprintln!("remo: the command timed out on the server and was killed");
                }
            }
            u8::try_from(code).unwrap_or(1)
        }
        Command::Get { remote, local } => {
            let local = local.clone().unwrap_or_else(|| {
                PathBuf::from(Path::new(remote).file_name().unwrap_or(remote.as_ref()))
            });
            let started = Instant::now();
            let mut bar: Option<indicatif::ProgressBar> = None;
            let json = args.json;
            let bytes = client
                .get(remote, &local, |done, total| {
                    let bar = bar.get_or_insert_with(|| {
                        progress_bar(total, json).unwrap_or_else(indicatif::ProgressBar::hidden)
                    });
                    bar.set_position(done);
                })
                .await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            report_transfer(args.json, "get", bytes, started);
            0
        }
        Command::Put { local, remote } => {
            let remote = match remote {
                Some(remote) => remote.clone(),
                None => local
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| Failure::Usage("give a remote name".into()))?
                    .to_owned(),
            };
            let size = std::fs::metadata(local)?.len();
            let started = Instant::now();
            let bar = progress_bar(Some(size), args.json);
            let shown = bar.clone();
            let bytes = client
                .put(local, &remote, move |done| {
                    if let Some(bar) = &shown {
                        bar.set_position(done);
                    }
                })
                .await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            report_transfer(args.json, "put", bytes, started);
            0
        }
        Command::Shell => shell(client).await?,
    };
    Ok(code)
}

#[allow(clippy::print_stdout)] // a CLI: results go to stdout
fn print_text(json: bool, key: &str, text: &str) {
    if json {
        println!("{}", serde_json::json!({ key: text }));
    } else {
        println!("{text}");
    }
}

#[allow(clippy::print_stdout)] // a CLI: results go to stdout
fn report_transfer(json: bool, what: &str, bytes: u64, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let rate = bytes as f64 / seconds.max(1e-9) / 1e6;
    if json {
        println!(
            "{}",
            serde_json::json!({ "op": what, "bytes": bytes, "seconds": seconds, "mb_per_s": rate })
        );
    } else {
        eprintln!("{what}: {bytes} bytes in {seconds:.2} s ({rate:.1} MB/s)");
    }
}

const SHELL_HELP: &str = "commands:
  exec CMD            run CMD and print its output
  iexec CMD           start an interactive command
  idata TEXT          send TEXT and a newline to it, print what it says
  idata               poll for more output
  iend                close its input and print the rest of its output
  get REMOTE [LOCAL]  download (one name: the same on both sides)
  put REMOTE [LOCAL]  upload LOCAL (default REMOTE) to REMOTE
  help, quit";

#[allow(clippy::print_stdout)] // a CLI: results go to stdout
async fn shell(client: &mut Client) -> Result<u8, Failure> {
    let mut editor =
        rustyline::DefaultEditor::new().map_err(|e| Failure::Usage(format!("terminal: {e}")))?;
    let mut stdout = std::io::stdout();
    loop {
        let line = match editor.readline("remo> ") {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(_) => break,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        let (verb, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let result: Result<(), Failure> = async {
            match verb {
                "quit" | "exit" => return Err(Failure::Usage(String::new())),
                "help" | "?" => println!("{SHELL_HELP}"),
                "exec" => {
                    let out = client.exec(rest, b"").await?;
                    stdout.write_all(&out.output)?;
                    if let Some(code) = out.exit_status.filter(|&c| c != 0) {
                        eprintln!("[exit status {code}]");
                    }
                }
                "iexec" => stdout.write_all(&client.iexec(rest).await?)?,
                "idata" => {
                    let data = if rest.is_empty() {
                        Vec::new()
                    } else {
                        format!("{rest}\n").into_bytes()
                    };
                    stdout.write_all(&client.idata(&data).await?)?;
                }
                "iend" => stdout.write_all(&client.iend().await?)?,
                "get" | "put" => {
                    let words =
                        shell_words::split(rest).map_err(|e| Failure::Usage(e.to_string()))?;
                    let (remote, local) = match words.as_slice() {
                        [remote] => (remote.clone(), PathBuf::from(remote)),
                        [remote, local] => (remote.clone(), PathBuf::from(local)),
                        _ => return Err(Failure::Usage(format!("usage: {verb} REMOTE [LOCAL]"))),
                    };
                    let bytes = if verb == "get" {
                        client.get(&remote, &local, |_, _| {}).await?
                    } else {
                        client.put(&local, &remote, |_| {}).await?
                    };
                    eprintln!("{verb}: {bytes} bytes");
                }
                other => eprintln!("unknown command {other:?}; try help"),
            }
            stdout.flush()?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {}
            Err(Failure::Usage(text)) if text.is_empty() => break,
            Err(err) => eprintln!("error: {err}"),
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_exit_with_the_codes_the_help_lists() {
        let status = |status| {
            Failure::Client(ClientError::Status {
                status,
                message: String::new(),
            })
            .exit_code()
        };
        assert_eq!(status(403), exit::NOPERM);
        assert_eq!(status(404), exit::NOINPUT);
        assert_eq!(status(413), exit::DATAERR);
        assert_eq!(status(500), exit::UNAVAILABLE);
        let connect = ClientError::Connect {
            url: "http://x".into(),
            detail: "refused".into(),
        };
        assert_eq!(Failure::Client(connect).exit_code(), exit::UNAVAILABLE);
        assert_eq!(
            Failure::Client(ClientError::LoginRefused(403)).exit_code(),
            exit::NOPERM
        );
        assert_eq!(
            Failure::Client(ClientError::ServerKey).exit_code(),
            exit::NOPERM
        );
        assert_eq!(
            Failure::Client(ClientError::Protocol("x".into())).exit_code(),
            76
        );
        assert_eq!(
            Failure::Client(ClientError::Io("x".into())).exit_code(),
            exit::IOERR
        );
        let missing = KeyError::Io {
            path: "k.pem".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(Failure::Key(missing).exit_code(), exit::NOINPUT);
        assert_eq!(Failure::Key(KeyError::NotEd448).exit_code(), exit::DATAERR);
        assert_eq!(Failure::Usage("no user".into()).exit_code(), exit::USAGE);
    }
}
