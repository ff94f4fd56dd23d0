//! Integration tests: run the built `certgen` binary in a temporary directory, then check
//! its files with OpenSSL (`openssl verify`) and Python's `ssl` module (loading chains and
//! keys, and a full TLS handshake over memory BIOs). Tests skip those external checks with
//! a printed note when `openssl` or `python3` is missing.

mod crl;
mod dev_pki;
mod issue;
mod usage;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// What one run of a program produced.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    fn from(output: std::process::Output) -> Self {
        Self {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Ok(stdout) on exit code 0, otherwise Err(stdout and stderr).
    fn success(self) -> Result<String, String> {
        if self.code == Some(0) {
            Ok(self.stdout)
        } else {
            Err(format!("{}{}", self.stdout, self.stderr))
        }
    }
}

/// Runs `certgen args...` with `dir` as the working directory.
pub(crate) fn certgen(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_certgen"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run certgen");
    Run::from(output)
}

/// Runs certgen and asserts it succeeded; returns stdout.
pub(crate) fn certgen_ok(dir: &Path, args: &[&str]) -> String {
    let run = certgen(dir, args);
    assert_eq!(run.code, Some(0), "certgen {args:?} failed: {run:?}");
    run.stdout
}

/// `certgen inspect FILE --json` parsed.
pub(crate) fn inspect_json(dir: &Path, file: &str) -> serde_json::Value {
    let out = certgen_ok(dir, &["inspect", file, "--json"]);
    serde_json::from_str(&out).expect("inspect prints json")
}

fn tool_available(tool: &str, probe: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("note: {tool} not found; skipping the checks that need it");
    }
    ok
}

/// Whether `openssl` can be run (prints a note once per test otherwise).
pub(crate) fn have_openssl() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| tool_available("openssl", &["version"]))
}

/// Whether `python3` with the `ssl` module can be run.
pub(crate) fn have_python() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| tool_available("python3", &["-c", "import ssl"]))
}

/// `openssl verify ARGS` in `dir`; Ok(stdout) when it reports success.
pub(crate) fn openssl_verify(dir: &Path, args: &[&str]) -> Result<String, String> {
    let output = Command::new("openssl")
        .arg("verify")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    Run::from(output).success()
}

/// Python: a server and a client context, each loading its chain, key and trust anchors,
/// then a TLS handshake through memory BIOs with hostname checking for `localhost`.
/// Arguments: server_chain server_key client_ca|- client_chain|- client_key|- server_ca.
const PY_HANDSHAKE: &str = r#"
import ssl, sys
server_chain, server_key, client_ca, client_chain, client_key, server_ca = sys.argv[1:7]
srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
srv.load_cert_chain(server_chain, server_key)
if client_ca != "-":
    srv.verify_mode = ssl.CERT_REQUIRED
    srv.load_verify_locations(client_ca)
cli = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
cli.load_verify_locations(server_ca)
if client_chain != "-":
    cli.load_cert_chain(client_chain, None if client_key == "-" else client_key)
bios = [ssl.MemoryBIO() for _ in range(4)]
s = srv.wrap_bio(bios[0], bios[1], server_side=True)
c = cli.wrap_bio(bios[2], bios[3], server_hostname="localhost")
done = {"c": False, "s": False}
def step(name, obj):
    if done[name]:
        return
    try:
        obj.do_handshake()
        done[name] = True
    except ssl.SSLWantReadError:
        pass
try:
    for _ in range(10):
        step("c", c)
        bios[0].write(bios[3].read())
        step("s", s)
        bios[2].write(bios[1].read())
        if done["c"] and done["s"]:
            break
    # TLS 1.3 checks the client certificate after the client finished: exchange data too.
    c.write(b"ping")
    bios[0].write(bios[3].read())
    assert s.read(4) == b"ping"
except ssl.SSLError as e:
    print("handshake failed:", e)
    sys.exit(1)
if not (done["c"] and done["s"]):
    print("handshake did not finish")
    sys.exit(1)
peer = s.getpeercert()
print("ok", dict(x[0] for x in peer["subject"]).get("commonName") if peer else "-")
"#;

/// Runs [`PY_HANDSHAKE`]; Ok(stdout) on success.
pub(crate) fn py_handshake(
    dir: &Path,
    server: (&str, &str),
    client_ca: Option<&str>,
    client: Option<(&str, &str)>,
    server_ca: &str,
) -> Result<String, String> {
    let (client_chain, client_key) = client.unwrap_or(("-", "-"));
    let output = Command::new("python3")
        .args(["-c", PY_HANDSHAKE, server.0, server.1])
        .arg(client_ca.unwrap_or("-"))
        .args([client_chain, client_key, server_ca])
        .current_dir(dir)
        .output()
        .expect("run python3");
    Run::from(output).success()
}

/// Python: load a chain and key (or a combined file) and trust anchors, without handshaking.
pub(crate) fn py_load(dir: &Path, chain: &str, key: Option<&str>, ca: &str) {
    let script = "import ssl, sys\n\
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
        c.load_cert_chain(sys.argv[1], None if sys.argv[2] == '-' else sys.argv[2])\n\
        c.load_verify_locations(sys.argv[3])\n";
    let output = Command::new("python3")
        .args(["-c", script, chain, key.unwrap_or("-"), ca])
        .current_dir(dir)
        .output()
        .expect("run python3");
    let run = Run::from(output);
    assert_eq!(
        run.code,
        Some(0),
        "python could not load {chain} / {key:?} / {ca}: {run:?}"
    );
}

/// The Unix permission bits of a file.
#[cfg(unix)]
pub(crate) fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// Whether `node` can be run.
pub(crate) fn have_node() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| tool_available("node", &["--version"]))
}

/// Node: a `tls` server with `requestCert` and a `tls` client over loopback, both from the
/// files `<server>.cert.pem`/`.key.pem` and `<client>.cert.pem`/`.key.pem`, trusting `ca.cert.pem`.
const NODE_HANDSHAKE: &str = r#"
const tls = require('tls'), fs = require('fs');
const [server, client] = process.argv.slice(1);
const read = (f) => fs.readFileSync(f);
const srv = tls.createServer({cert: read(server + '.cert.pem'), key: read(server + '.key.pem'),
  ca: read('ca.cert.pem'), requestCert: true, rejectUnauthorized: true}, (s) => {
  s.end('ok ' + s.getPeerCertificate().subject.CN + '\n');
});
srv.on('tlsClientError', () => {});
srv.listen(0, '127.0.0.1', () => {
  const c = tls.connect({port: srv.address().port, host: '127.0.0.1', servername: 'localhost',
    ca: read('ca.cert.pem'), cert: read(client + '.cert.pem'), key: read(client + '.key.pem')});
  let data = '';
  c.on('data', (d) => { data += d; });
  c.on('error', (e) => { console.log('refused', e.code || e.message); process.exit(1); });
  c.on('end', () => { console.log(data.trim()); process.exit(data.startsWith('ok') ? 0 : 1); });
});
setTimeout(() => { console.log('timeout'); process.exit(2); }, 10000);
"#;

/// Runs [`NODE_HANDSHAKE`] in `dir`; Ok(stdout) on success.
pub(crate) fn node_handshake(dir: &Path, server: &str, client: &str) -> Result<String, String> {
    let output = Command::new("node")
        .args(["-e", NODE_HANDSHAKE, server, client])
        .current_dir(dir)
        .output()
        .expect("run node");
    Run::from(output).success()
}
