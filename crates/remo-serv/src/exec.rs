//! Running commands without a shell: one-shot (`/cmd`) and interactive (`/icm`, `/idt`,
//! `/edt`).
//!
//! Command lines are split with POSIX shell-word rules (`shell-words`, like `shlex.split`)
//! and executed directly: no pipes, redirections, globbing or `$VAR`. Each command gets its own
//! process group so that a timeout, a replaced interactive command, a logout or a session
//! expiry stops the whole group (SIGTERM, then SIGKILL after a grace period).

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

/// Bytes one interactive read returns at most (as the original).
pub const INTERACTIVE_READ: usize = 8_192;

/// Why a command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Unbalanced quotes or a dangling escape.
    #[error("cannot split the command line: {0}")]
    Quoting(String),
    /// Nothing to run.
    #[error("empty command line")]
    Empty,
    /// The program does not exist or cannot be executed.
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        /// argv\[0\].
        program: String,
        /// The cause.
        source: io::Error,
    },
    /// The output went over the configured cap; the command was stopped.
    #[error("command output exceeds {0} bytes; the command was stopped")]
    OutputTooLarge(usize),
    /// Reading or writing the command's pipes failed.
    #[error("command I/O: {0}")]
    Io(#[from] io::Error),
}

/// Splits a command line like `shlex.split`.
///
/// # Errors
/// [`ExecError::Quoting`] or [`ExecError::Empty`].
pub fn split(line: &str) -> Result<Vec<String>, ExecError> {
    let argv = shell_words::split(line).map_err(|e| ExecError::Quoting(e.to_string()))?;
    if argv.is_empty() {
        return Err(ExecError::Empty);
    }
    Ok(argv)
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code; `128 + signal` when killed by a signal; 124 on timeout (as `timeout(1)`).
    pub code: i32,
    /// Whether the command timed out and was killed.
    pub timed_out: bool,
}

impl Exit {
    fn of(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt as _;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(255);
        Self {
            code,
            timed_out: false,
        }
    }
}

/// Sends `signal` to the process group led by `pid` (ignoring "no such process").
fn signal_group(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// Kills a command's process group when dropped, unless disarmed: a client that hangs up
/// mid-`/cmd` does not leave the command running.
struct GroupGuard {
    pid: Option<u32>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            signal_group(pid, Signal::KILL);
        }
    }
}

/// A socketpair end for the child: `copies` descriptors of the same socket.
fn child_ends(child_end: std::os::unix::net::UnixStream, copies: usize) -> io::Result<Vec<Stdio>> {
    let mut ends = Vec::with_capacity(copies);
    for _ in 1..copies {
        ends.push(Stdio::from(OwnedFd::from(child_end.try_clone()?)));
    }
    ends.push(Stdio::from(OwnedFd::from(child_end)));
    Ok(ends)
}

fn command(argv: &[String], workdir: &Path) -> Command {
    let mut cmd = Command::new(&argv[0]);
    // Commands do not inherit the daemon's systemd plumbing.
    cmd.args(&argv[1..])
        .current_dir(workdir)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .process_group(0)
        .kill_on_drop(false);
    cmd
}

fn spawn(cmd: &mut Command, program: &str) -> Result<Child, ExecError> {
    cmd.spawn().map_err(|source| ExecError::Spawn {
        program: program.to_owned(),
        source,
    })
}

/// Limits of one-shot commands.
#[derive(Debug, Clone, Copy)]
pub struct CmdLimits {
    /// Kill the process group after this long (`None`: never, as the original).
    pub timeout: Option<Duration>,
    /// Most output bytes kept; beyond, the command is stopped and the request fails.
    pub max_output: usize,
}

/// Runs `argv` with `stdin` as its input, stdout and stderr merged in write order.
///
/// # Errors
/// [`ExecError`]; a spawn failure is the caller's 400.
pub async fn run(
    argv: &[String],
    stdin: Vec<u8>,
    workdir: &Path,
    limits: CmdLimits,
) -> Result<(Vec<u8>, Exit), ExecError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut ends = child_ends(theirs, 2)?;
    let mut cmd = command(argv, workdir);
    cmd.stdin(Stdio::piped())
        .stderr(ends.pop().unwrap_or_else(Stdio::null))
        .stdout(ends.pop().unwrap_or_else(Stdio::null));
    let mut child = spawn(&mut cmd, &argv[0])?;
    drop(cmd); // closes our copies of the child's ends, so EOF arrives when it exits
    let mut guard = GroupGuard { pid: child.id() };
    ours.set_nonblocking(true)?;
    let mut output_stream = UnixStream::from_std(ours)?;

    let mut child_stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut pipe) = child_stdin.take() {
            // A command that does not read its input is not an error.
            let _ = pipe.write_all(&stdin).await;
        }
    };
    let mut output = Vec::new();
    let collect = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = output_stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, ExecError>(());
            }
            if output.len() + n > limits.max_output {
                return Err(ExecError::OutputTooLarge(limits.max_output));
            }
            output.extend_from_slice(&buf[..n]);
        }
    };
    let work = async {
        let ((), collected) = tokio::join!(feed, collect);
        collected?;
        let status = child.wait().await?;
        Ok::<_, ExecError>(Exit::of(status))
    };
    let result = match limits.timeout {
        None => work.await,
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => {
                if let Some(pid) = guard.pid.take() {
                    signal_group(pid, Signal::KILL);
                }
                let _ = child.wait().await;
                // Whatever the command wrote just before the deadline may still be queued.
                let mut buf = vec![0u8; 64 * 1024];
                while output.len() < limits.max_output {
                    match output_stream.try_read(&mut buf) {
                        Ok(n) if n > 0 => output.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                output.truncate(limits.max_output);
                return Ok((
                    output,
                    Exit {
                        code: 124,
                        timed_out: true,
                    },
                ));
            }
        },
    };
    let exit = result?;
    guard.pid = None; // finished by itself: leave any background descendants alone
    Ok((output, exit))
}

/// An interactive command attached to a session: its stdin, stdout and stderr are one end of
/// a socketpair, the other end is here.
#[derive(Debug)]
pub struct Interactive {
    child: Child,
    /// Our end; taken only when the command is dropped (see [`Interactive`]'s `Drop`).
    stream: Option<UnixStream>,
    pid: Option<u32>,
    grace: Duration,
    /// Counts it in `remo_serv_commands_running` until it is dropped.
    running: Option<crate::metrics::Running>,
}

/// What an interactive read saw.
#[derive(Debug, PartialEq, Eq)]
pub struct Read {
    /// Bytes read (at most [`INTERACTIVE_READ`]).
    pub data: Vec<u8>,
    /// The command closed its output: it is not kept any longer.
    pub eof: bool,
}

impl Interactive {
    /// Starts `argv` on a socketpair and writes `input` to it.
    ///
    /// # Errors
    /// [`ExecError`].
    pub async fn start(
        argv: &[String],
        input: &[u8],
        workdir: &Path,
        grace: Duration,
    ) -> Result<Self, ExecError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut ends = child_ends(theirs, 3)?;
        let mut cmd = command(argv, workdir);
        cmd.stderr(ends.pop().unwrap_or_else(Stdio::null))
            .stdout(ends.pop().unwrap_or_else(Stdio::null))
            .stdin(ends.pop().unwrap_or_else(Stdio::null));
        let child = spawn(&mut cmd, &argv[0])?;
        drop(cmd);
        ours.set_nonblocking(true)?;
        let pid = child.id();
        let mut this = Self {
            child,
            stream: Some(UnixStream::from_std(ours)?),
            pid,
            grace,
            running: None,
        };
        this.write(input).await?;
        Ok(this)
    }

    /// Counts the command in `remo_serv_commands_running` for as long as it is kept.
    pub fn count_as(&mut self, running: crate::metrics::Running) {
        self.running = Some(running);
    }

    /// Writes `input` to the command (nothing when empty).
    ///
    /// # Errors
    /// The command closed its input.
    pub async fn write(&mut self, input: &[u8]) -> io::Result<()> {
        if !input.is_empty() {
            self.stream()?.write_all(input).await?;
        }
        Ok(())
    }

    /// Waits `wait`, then reads once what is there (at most [`INTERACTIVE_READ`] bytes).
    ///
    /// # Errors
    /// Socket errors.
    pub async fn read_after(&mut self, wait: Duration) -> io::Result<Read> {
        tokio::time::sleep(wait).await;
        let mut buf = vec![0u8; INTERACTIVE_READ];
        // The readiness may not have been seen yet by the reactor; a millisecond settles it.
        let stream = self.stream()?;
        match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await {
            Ok(Ok(0)) => Ok(Read {
                data: Vec::new(),
                eof: true,
            }),
            Ok(Ok(n)) => {
                buf.truncate(n);
                Ok(Read {
                    data: buf,
                    eof: false,
                })
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Ok(Read {
                data: Vec::new(),
                eof: false,
            }),
        }
    }

    /// Half-closes the command's input (it sees EOF) and hands back the stream, from which
    /// the rest of its output is read until it closes it.
    ///
    /// # Errors
    /// Socket errors.
    pub async fn finish(mut self) -> io::Result<FinishedOutput> {
        self.stream()?.shutdown().await?;
        Ok(FinishedOutput { inner: self })
    }

    /// Our end of the socketpair (there until the command is dropped).
    fn stream(&mut self) -> io::Result<&mut UnixStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// The command's pid.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// SIGTERM to the group, then SIGKILL if the command has not exited within `grace`;
    /// returns once it is gone (or killed).
    pub async fn terminate(mut self, grace: Duration) {
        let Some(pid) = self.pid.take() else {
            return;
        };
        signal_group(pid, Signal::TERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            signal_group(pid, Signal::KILL);
            let _ = tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await;
        }
    }
}

impl Drop for Interactive {
    /// Replaced, logged out or expired: SIGTERM to the group, SIGKILL after the grace period
    /// if it is still there.
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else {
            return;
        };
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal_group(pid, Signal::TERM);
        let grace = self.grace;
        let stream = self.stream.take();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let deadline = tokio::time::Instant::now() + grace;
                // Its output is read and thrown away during the grace: with our end closed,
                // a command that writes while it stops (a shell's "Terminated", a goodbye)
                // would die of SIGPIPE at once instead of finishing.
                if let Some(mut stream) = stream {
                    let mut buf = vec![0u8; INTERACTIVE_READ];
                    let drain =
                        async { while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {} };
                    let _ = tokio::time::timeout_at(deadline, drain).await;
                }
                tokio::time::sleep_until(deadline).await;
                signal_group(pid, Signal::KILL);
            });
        } else {
            signal_group(pid, Signal::KILL);
        }
    }
}

/// The remaining output of an interactive command after `/edt`.
#[derive(Debug)]
pub struct FinishedOutput {
    inner: Interactive,
}

impl FinishedOutput {
    /// Reads the next piece (at most [`INTERACTIVE_READ`] bytes); `None` at EOF.
    ///
    /// # Errors
    /// Socket errors.
    pub async fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; INTERACTIVE_READ];
        let n = self.inner.stream()?.read(&mut buf).await?;
        if n == 0 {
            // It closed its output: reap it if it has exited, and do not signal it.
            let _ = self.inner.child.try_wait();
            self.inner.pid = None;
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CmdLimits {
        CmdLimits {
            timeout: Some(Duration::from_secs(10)),
            max_output: 1 << 20,
        }
    }

    fn argv(line: &str) -> Vec<String> {
        split(line).unwrap()
    }

    #[test]
    fn splitting_follows_shell_words() {
        assert_eq!(
            argv("echo 'a b' \"c\\\"d\" e\\ f"),
            ["echo", "a b", "c\"d", "e f"]
        );
        assert!(matches!(split("echo 'oops"), Err(ExecError::Quoting(_))));
        assert!(matches!(split("   "), Err(ExecError::Empty)));
    }

    #[tokio::test]
    async fn merged_output_stdin_and_exit_status() {
        let dir = std::env::temp_dir();
        let (out, exit) = run(
            &argv("sh -c 'cat; echo err >&2; exit 3'"),
            b"in\n".to_vec(),
            &dir,
            limits(),
        )
        .await
        .unwrap();
        assert_eq!(out, b"in\nerr\n");
        assert_eq!(
            exit,
            Exit {
                code: 3,
                timed_out: false
            }
        );
        // No shell: metacharacters are plain arguments.
        let (out, _) = run(&argv("echo $HOME ; ls | wc"), Vec::new(), &dir, limits())
            .await
            .unwrap();
        assert_eq!(out, b"$HOME ; ls | wc\n");
        assert!(matches!(
            run(&argv("/no/such/program"), Vec::new(), &dir, limits()).await,
            Err(ExecError::Spawn { .. })
        ));
    }

    #[tokio::test]
    async fn timeout_kills_the_group_and_output_is_capped() {
        let dir = std::env::temp_dir();
        let started = std::time::Instant::now();
        let short = CmdLimits {
            timeout: Some(Duration::from_millis(300)),
            max_output: 1024,
        };
        let (out, exit) = run(
            &argv("sh -c 'echo early; sleep 30 & sleep 30'"),
            Vec::new(),
            &dir,
            short,
        )
        .await
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            exit,
            Exit {
                code: 124,
                timed_out: true
            }
        );
        assert_eq!(out, b"early\n");
        assert!(matches!(
            run(&argv("head -c 4096 /dev/zero"), Vec::new(), &dir, short).await,
            Err(ExecError::OutputTooLarge(1024))
        ));
    }

    #[tokio::test]
    async fn interactive_round_trip_and_finish() {
        let dir = std::env::temp_dir();
        let wait = Duration::from_millis(100);
        let mut cat = Interactive::start(&argv("cat"), b"one\n", &dir, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(cat.read_after(wait).await.unwrap().data, b"one\n");
        cat.write(b"two\n").await.unwrap();
        assert_eq!(cat.read_after(wait).await.unwrap().data, b"two\n");
        cat.write(b"three\n").await.unwrap();
        let mut rest = cat.finish().await.unwrap();
        assert_eq!(rest.next().await.unwrap().unwrap(), b"three\n");
        assert_eq!(rest.next().await.unwrap(), None);

        let mut quick = Interactive::start(&argv("echo hi"), b"", &dir, Duration::from_secs(1))
            .await
            .unwrap();
        let first = quick.read_after(wait).await.unwrap();
        assert_eq!(first.data, b"hi\n");
        assert!(quick.read_after(wait).await.unwrap().eof);
    }

    #[tokio::test]
    async fn dropping_an_interactive_command_terminates_it() {
        let dir = std::env::temp_dir();
        let sleeper = Interactive::start(&argv("sleep 30"), b"", &dir, Duration::from_millis(200))
            .await
            .unwrap();
        let pid = sleeper.pid().unwrap();
        drop(sleeper);
        let proc_path = format!("/proc/{pid}/stat");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            // Gone, or a zombie waiting for tokio's reaper.
            let state = std::fs::read_to_string(&proc_path).unwrap_or_default();
            if state.is_empty() || state.contains(") Z") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sleep survived: {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
