//! The original protocol: the three messages byte for byte, as the original's Python client
//! reads them; a single file; the ten-file limit; concurrent and silent clients.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncReadExt as _;

use crate::support::{Answer, Options, STEP, TestServer, pki, test_limits, tls_connect};

/// The per-file keys in the original's order.
const KEYS: [&str; 7] = [
    "package",
    "fileset",
    "vrmf",
    "ftype",
    "keyid",
    "timestamp",
    "signature",
];

/// What Python's `json.dumps` writes for `{name: {KEYS...}}` in `names` order, built from the
/// parsed answer: a different separator or key order makes it differ from the bytes sent.
fn python_dumps(files: &Value, names: &[&str]) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap();
    let entries: Vec<String> = names
        .iter()
        .map(|name| {
            let fields: Vec<String> = KEYS
                .iter()
                .map(|k| format!("{}: {}", quote(k), quote(files[name][k].as_str().unwrap())))
                .collect();
            format!("{}: {{{}}}", quote(name), fields.join(", "))
        })
        .collect();
    format!("{{{}}}", entries.join(", "))
}

/// Runs `python3 -c script args...` and returns its stdout; panics when it fails.
async fn python(script: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is needed for these tests: {e}"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .expect("python3 finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs `python3 -c script args...`; whether it exited 0, and its stdout.
async fn python_status(script: &str, args: &[&str]) -> (bool, Vec<u8>) {
    let child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is needed for these tests: {e}"));
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .expect("python3 finishes")
        .unwrap();
    (out.status.success(), out.stdout)
}

fn lpp_dir(server: &TestServer) -> std::path::PathBuf {
    let dir = server.pkgs.join("lpp");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("bos.rte.libc.7.3.2.1.bff"), b"libc image").unwrap();
    std::fs::write(dir.join("B.txt"), b"capital").unwrap();
    std::fs::write(dir.join("a.bin"), b"").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    dir
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test]
async fn a_directory_gets_the_listing_the_python_json_and_the_trailer_byte_for_byte() {
    let server = TestServer::start(Options::default()).await;
    let dir = lpp_dir(&server);
    let path = text(&dir);
    let whole = server.alice_legacy(path).await;
    let answer = Answer::parse(&whole);

    assert_eq!(
        answer.listing,
        format!("List of files in {path}:\nB.txt\na.bin\nbos.rte.libc.7.3.2.1.bff\nsub\n")
    );
    let files = answer.files();
    let names = ["B.txt", "a.bin", "bos.rte.libc.7.3.2.1.bff"];
    assert_eq!(files.as_object().unwrap().len(), 3, "{files}");
    assert_eq!(answer.json, python_dumps(&files, &names));
    // Python itself re-dumps the object to the same bytes (json.loads keeps the key order).
    let redumped = python(
        "import json,sys; sys.stdout.write(json.dumps(json.loads(sys.stdin.read())))",
        &[],
        answer.json.as_bytes(),
    )
    .await;
    assert_eq!(String::from_utf8(redumped).unwrap(), answer.json);
    assert_eq!(
        answer.trailer,
        format!(
            "\nSignatures written to: {}/signatures.txt\n",
            server.state.display()
        )
    );

    let libc = &files["bos.rte.libc.7.3.2.1.bff"];
    assert_eq!(libc["package"], "bos");
    assert_eq!(libc["fileset"], "bos.rte.libc");
    assert_eq!(libc["vrmf"], "7.3.2.1");
    assert_eq!(libc["ftype"], "I");
    for name in names {
        assert_eq!(files[name]["keyid"], server.keyid.as_str());
        let timestamp = files[name]["timestamp"].as_str().unwrap();
        assert!(timestamp.ends_with('Z'), "{timestamp}");
        time::OffsetDateTime::parse(timestamp, &time::format_description::well_known::Rfc3339)
            .unwrap();
    }

    // signatures.txt: the header and one line per signed file.
    let lines = std::fs::read_to_string(server.signatures_file()).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(
        lines[0],
        "#package:fileset:vrmf:ftype:keyid:timestamp:signature"
    );
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(
        lines.iter().any(|l| l
            .starts_with(&format!("bos:bos.rte.libc:7.3.2.1:I:{}:", server.keyid))
            && l.ends_with(libc["signature"].as_str().unwrap())),
        "{lines:?}"
    );
}

/// The original client, as it was (no ALPN, no server verification, three `recv_all` reads),
/// but presenting a certificate.
const ORIGINAL_CLIENT: &str = r#"
import json, socket, ssl, sys
host, port, cert, key, path = sys.argv[1:6]

def recv_all(s):
    data = b""
    while True:
        chunk = s.recv(4096)
        data += chunk
        if len(chunk) < 4096:
            return data

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if cert:
    ctx.load_cert_chain(cert, key)
s = ctx.wrap_socket(socket.create_connection((host, int(port))))
s.send(("/" + path).encode())
print(json.dumps([recv_all(s).decode() for _ in range(3)]))
s.close()
"#;

#[tokio::test]
async fn the_original_python_client_reads_one_message_per_recv_all() {
    let server = TestServer::start(Options::default()).await;
    let dir = lpp_dir(&server);
    let pki = pki();
    // The original client sends '/' + PATH.
    let relative = text(&dir).trim_start_matches('/').to_owned();
    let out = python(
        ORIGINAL_CLIENT,
        &[
            "127.0.0.1",
            &server.addr.port().to_string(),
            text(&pki.alice.cert_path),
            text(&pki.alice.key_path),
            &relative,
        ],
        b"",
    )
    .await;
    let messages: Vec<String> = serde_json::from_slice(&out).unwrap();
    let path = text(&dir);
    assert_eq!(
        messages[0],
        format!("List of files in {path}:\nB.txt\na.bin\nbos.rte.libc.7.3.2.1.bff\nsub\n")
    );
    let files: Value = serde_json::from_str(&messages[1]).unwrap();
    assert_eq!(
        messages[1],
        python_dumps(&files, &["B.txt", "a.bin", "bos.rte.libc.7.3.2.1.bff"])
    );
    assert_eq!(
        messages[2],
        format!(
            "\nSignatures written to: {}\n",
            server.signatures_file().display()
        )
    );
}

#[tokio::test]
async fn the_original_client_without_a_certificate_works_where_the_operator_allows_it() {
    // The original client presents no certificate. An operator who must keep it unchanged
    // sets client_auth = "off" and a cn = "*" rule for the roots it may sign.
    let options = Options {
        client_auth: Some(common::tls::ClientAuth::Off),
        anyone_signs_pkgs: true,
        ..Options::default()
    };
    let server = TestServer::start(options).await;
    let dir = lpp_dir(&server);
    let relative = text(&dir).trim_start_matches('/').to_owned();
    let out = python(
        ORIGINAL_CLIENT,
        &[
            "127.0.0.1",
            &server.addr.port().to_string(),
            "",
            "",
            &relative,
        ],
        b"",
    )
    .await;
    let messages: Vec<String> = serde_json::from_slice(&out).unwrap();
    assert!(messages[0].starts_with(&format!("List of files in {}:\n", text(&dir))));
    let files: Value = serde_json::from_str(&messages[1]).unwrap();
    assert_eq!(files.as_object().unwrap().len(), 3);
    assert!(messages[2].starts_with("\nSignatures written to: "));
    let rows = server.service.audit.rows().await.unwrap();
    assert!(
        rows.iter().all(|r| r.0 == "-"),
        "no certificate: identity '-'"
    );
    // With the default (certificates required) the same client gets nothing.
    let strict = TestServer::start(Options::default()).await;
    let dir = lpp_dir(&strict);
    let relative = text(&dir).trim_start_matches('/').to_owned();
    let (ok, out) = python_status(
        ORIGINAL_CLIENT,
        &[
            "127.0.0.1",
            &strict.addr.port().to_string(),
            "",
            "",
            &relative,
        ],
    )
    .await;
    let got_listing = ok
        && serde_json::from_slice::<Vec<String>>(&out)
            .is_ok_and(|m| m.first().is_some_and(|first| !first.is_empty()));
    assert!(
        !got_listing,
        "a client without a certificate must get nothing by default"
    );
    assert!(strict.service.audit.rows().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_single_file_is_signed() {
    let server = TestServer::start(Options::default()).await;
    let file = server.pkgs.join("bos.rte.7.3.0.0.U");
    std::fs::write(&file, b"update image").unwrap();
    let path = text(&file);
    let answer = Answer::parse(&server.alice_legacy(path).await);
    assert_eq!(answer.listing, format!("File to be signed: {path}\n"));
    let files = answer.files();
    assert_eq!(answer.json, python_dumps(&files, &["bos.rte.7.3.0.0.U"]));
    let fields = &files["bos.rte.7.3.0.0.U"];
    assert_eq!(
        (
            &fields["package"],
            &fields["fileset"],
            &fields["vrmf"],
            &fields["ftype"]
        ),
        (
            &Value::from("bos"),
            &Value::from("bos.rte"),
            &Value::from("7.3.0.0"),
            &Value::from("S")
        )
    );
    assert_eq!(
        answer.trailer,
        format!(
            "\nSignatures written to: {}\n",
            server.signatures_file().display()
        )
    );
}

#[tokio::test]
async fn at_most_ten_files_are_signed_and_the_rest_are_named() {
    let server = TestServer::start(Options::default()).await;
    let dir = server.pkgs.join("many");
    std::fs::create_dir(&dir).unwrap();
    let names: Vec<String> = (0..12).map(|i| format!("f{i:02}")).collect();
    for name in &names {
        std::fs::write(dir.join(name), name.as_bytes()).unwrap();
    }
    std::fs::create_dir(dir.join("sub")).unwrap();
    let path = text(&dir);
    let answer = Answer::parse(&server.alice_legacy(path).await);

    let mut listing = format!("List of files in {path}:\n");
    for name in names.iter().map(String::as_str).chain(["sub"]) {
        listing.push_str(name);
        listing.push('\n');
    }
    assert_eq!(answer.listing, listing);
    let files = answer.files();
    let signed: Vec<&str> = names[..10].iter().map(String::as_str).collect();
    assert_eq!(files.as_object().unwrap().len(), 10);
    assert_eq!(answer.json, python_dumps(&files, &signed));
    assert_eq!(
        answer.trailer,
        format!(
            "\nSignatures written to: {}\nNot signed (more than max_files_per_request files): f10, f11\n",
            server.signatures_file().display()
        )
    );
    assert_eq!(server.service.audit.rows().await.unwrap().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_at_once_each_get_their_own_answer() {
    let server = TestServer::start(Options::default()).await;
    let dirs: Vec<_> = (0..20)
        .map(|i| {
            let dir = server.pkgs.join(format!("c{i:02}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join(format!("file-{i:02}")), format!("content {i}")).unwrap();
            dir
        })
        .collect();
    let requests = dirs.iter().enumerate().map(|(i, dir)| {
        let addr = server.addr;
        async move {
            let bytes = crate::support::legacy(addr, Some(&pki().alice), text(dir))
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            let answer = Answer::parse(&String::from_utf8(bytes).unwrap());
            assert_eq!(
                answer.listing,
                format!("List of files in {}:\nfile-{i:02}\n", text(dir))
            );
            let files = answer.files();
            assert_eq!(files.as_object().unwrap().len(), 1, "client {i}: {files}");
            assert!(files[format!("file-{i:02}")]["signature"].is_string());
            assert!(answer.trailer.starts_with("\nSignatures written to: "));
        }
    });
    tokio::time::timeout(STEP, futures_util::future::join_all(requests))
        .await
        .expect("all twenty answered");
    assert_eq!(server.service.audit.rows().await.unwrap().len(), 20);
}

#[tokio::test]
async fn a_silent_client_holds_up_nobody_and_is_cut_off() {
    let server = TestServer::start(Options {
        limits: signing_server::config::Limits {
            request_timeout_secs: 3,
            ..test_limits()
        },
        ..Options::default()
    })
    .await;
    std::fs::write(server.pkgs.join("p.bin"), b"p").unwrap();
    let connected = Instant::now();
    let mut silent = tls_connect(server.addr, Some(&pki().alice), false)
        .await
        .unwrap();

    let started = Instant::now();
    let answer = Answer::parse(&server.alice_legacy(text(&server.pkgs)).await);
    assert!(answer.files()["p.bin"]["signature"].is_string());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the request waited {:?} behind the silent client",
        started.elapsed()
    );

    // The server gives up on the silent client after request_timeout_secs.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(6), silent.read_to_end(&mut buf))
        .await
        .expect("the server closes the silent connection");
    assert!(buf.is_empty(), "{read:?} {buf:?}");
    let waited = connected.elapsed();
    assert!(
        waited >= Duration::from_millis(2900),
        "cut off after {waited:?}"
    );
}
