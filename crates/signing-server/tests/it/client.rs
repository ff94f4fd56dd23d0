//! The `signing-client` binary against the in-process server: the original protocol (the
//! seed's output, relative and default paths, `--json`, `~/.ssh` credentials), refusals and
//! their exit codes, uploads verified by key id and by PEM, and `keys`.

use std::path::Path;
use std::process::Stdio;

use signing_server::fields::Fields;
use testkit::pki::Leaf;

use crate::support::{Generated, Options, STEP, TestServer, pki};

/// What a run of the client left.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The `NAME: {json}` lines, parsed.
    fn signed(&self) -> Vec<(String, Fields)> {
        self.stdout
            .lines()
            .filter_map(|line| line.split_once(": {"))
            .map(|(name, rest)| {
                let fields = serde_json::from_str(&format!("{{{rest}"))
                    .unwrap_or_else(|e| panic!("{e}: {rest}"));
                (name.to_owned(), fields)
            })
            .collect()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("{e}: {:?} {:?}", self.stdout, self.stderr))
    }
}

/// How the client authenticates in a run.
#[derive(Clone, Copy)]
enum As<'a> {
    /// --ca, --cert, --key for this leaf.
    Leaf(&'a Leaf),
    /// No flags: `$HOME/.ssh` under this directory.
    Home(&'a Path),
}

/// Runs the client with `args` followed by the connection flags, in `cwd`, bounded by
/// [`STEP`].
async fn client(server: &TestServer, who: As<'_>, cwd: &Path, args: &[&str]) -> Run {
    let pki = pki();
    let port = server.addr.port().to_string();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_signing-client"));
    command
        .args(args)
        .args(["--host", "127.0.0.1", "--timeout", "10"]);
    if !args.contains(&"--port") {
        command.args(["--port", &port]);
    }
    for var in [
        "SIGNING_HOST",
        "SIGNING_PORT",
        "SIGNING_CERT",
        "SIGNING_KEY",
        "SIGNING_CA",
        "SIGNING_SERVER_NAME",
        "SIGNING_TIMEOUT",
    ] {
        command.env_remove(var);
    }
    match who {
        As::Leaf(leaf) => {
            command.arg("--ca").arg(&pki.ca_path);
            command.arg("--cert").arg(&leaf.cert_path);
            command.arg("--key").arg(&leaf.key_path);
            command.env("HOME", cwd);
        }
        As::Home(home) => {
            command.env("HOME", home);
        }
    }
    if !args.contains(&"--server-name") {
        command.args(["--server-name", "localhost"]);
    }
    command
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(STEP, command.output())
        .await
        .unwrap_or_else(|_| panic!("signing-client {args:?} did not finish in time"))
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn verify_file(server: &TestServer, path: &Path, fields: &Fields) -> bool {
    let key = signing_server::ed448::parse_public_pem(&server.public_pem).unwrap();
    let signature = crate::support::base64_decode(&fields.signature);
    signing_server::ed448::verify_stream(&key, &signature, std::fs::File::open(path).unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_protocol_prints_the_seeds_output() {
    let server = TestServer::start(Options::default()).await;
    let alice = As::Leaf(&pki().alice);
    let names = ["bos.rte.7.3.0.0.bff", "notes.txt", "tool.1.0.0.0.U"];
    for (i, name) in names.iter().enumerate() {
        std::fs::write(server.pkgs.join(name), format!("content {i}\n")).unwrap();
    }
    let pkgs = server.pkgs.to_str().unwrap();
    let signatures = server.signatures_file();

    let run = client(&server, alice, server.dir.path(), &[pkgs]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let expected_head =
        format!("List of files in {pkgs}:\nbos.rte.7.3.0.0.bff\nnotes.txt\ntool.1.0.0.0.U\n\n");
    assert!(run.stdout.starts_with(&expected_head), "{run:?}");
    assert!(
        run.stdout.ends_with(&format!(
            "\n\nSignatures written to: {}\nDisconnected from 127.0.0.1\n",
            signatures.display()
        )),
        "{run:?}"
    );
    let signed = run.signed();
    assert_eq!(
        signed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        names
    );
    for (name, fields) in &signed {
        assert_eq!(fields.keyid, server.keyid);
        assert!(
            verify_file(&server, &server.pkgs.join(name), fields),
            "{name}"
        );
    }
    assert_eq!(signed[0].1.fileset, "bos.rte");
    assert_eq!(signed[0].1.vrmf, "7.3.0.0");
    assert_eq!(signed[2].1.ftype, "S");
    // The README's key order: package first, signature last, Python's separators.
    assert!(
        run.stdout
            .contains("bos.rte.7.3.0.0.bff: {\"package\": \"bos\", \"fileset\": \"bos.rte\", ")
    );

    // One file.
    let one = format!("{pkgs}/notes.txt");
    let run = client(&server, alice, server.dir.path(), &[&one]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .starts_with(&format!("File to be signed: {one}\n\nnotes.txt: {{"))
    );
    assert_eq!(run.signed().len(), 1);

    // A relative path is joined to the current directory; no path means the directory itself.
    let run = client(&server, alice, server.dir.path(), &["pkgs"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.starts_with(&format!(
        "List of files in {}/pkgs:\n",
        server.dir.path().display()
    )));
    let run = client(&server, alice, &server.pkgs, &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .starts_with(&format!("List of files in {pkgs}:\n"))
    );
    assert_eq!(run.signed().len(), 3);

    // --json: one object.
    let run = client(&server, alice, server.dir.path(), &[pkgs, "--json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let value = run.json();
    assert_eq!(value["path"], pkgs);
    assert_eq!(value["directory"], true);
    assert_eq!(value["listing"].as_array().unwrap().len(), 3);
    assert_eq!(value["files"].as_object().unwrap().len(), 3);
    assert_eq!(value["files"]["notes.txt"]["keyid"], server.keyid.as_str());
    assert_eq!(value["signatures_file"], signatures.to_str().unwrap());
    assert!(
        value["trailer"]
            .as_str()
            .unwrap()
            .contains("Signatures written to")
    );

    // The seed's credentials: ~/.ssh/signing-client.{crt,key} and ~/.ssh/signing-ca.crt.
    let home = tempfile::tempdir().unwrap();
    let ssh = home.path().join(".ssh");
    std::fs::create_dir(&ssh).unwrap();
    std::fs::copy(&pki().alice.cert_path, ssh.join("signing-client.crt")).unwrap();
    std::fs::copy(&pki().alice.key_path, ssh.join("signing-client.key")).unwrap();
    std::fs::copy(&pki().ca_path, ssh.join("signing-ca.crt")).unwrap();
    let run = client(&server, As::Home(home.path()), home.path(), &[pkgs]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.signed().len(), 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_failures_have_their_exit_codes() {
    let server = TestServer::start(Options::default()).await;
    let pki = pki();
    let alice = As::Leaf(&pki.alice);
    std::fs::write(server.bobs.join("b.bff"), b"bob's").unwrap();
    std::fs::write(server.pkgs.join("a.bff"), b"alice's").unwrap();
    let cwd = server.dir.path();

    // Outside alice's roots: 77, the reason on stderr, nothing on stdout.
    let bobs = server.bobs.to_str().unwrap();
    let run = client(&server, alice, cwd, &[bobs]).await;
    assert_eq!(run.code, 77, "{run:?}");
    assert!(run.stderr.contains("outside the directories"), "{run:?}");
    assert!(run.stdout.is_empty());
    // Inside the roots but missing: refused, not a permission matter.
    let missing = format!("{}/nope", server.pkgs.display());
    let run = client(&server, alice, cwd, &[&missing]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no such file"), "{run:?}");
    // carol's certificate is trusted but no rule names her.
    let run = client(&server, As::Leaf(&pki.chained_client), cwd, &["pkgs"]).await;
    assert_eq!(run.code, 77, "{run:?}");
    // mallory's CA is not trusted by the server: a TLS failure.
    let run = client(&server, As::Leaf(&pki.mallory), cwd, &["pkgs"]).await;
    assert_eq!(run.code, 69, "{run:?}");
    // The server's certificate does not carry the name we expect.
    let run = client(
        &server,
        alice,
        cwd,
        &["pkgs", "--server-name", "signer.example.com"],
    )
    .await;
    assert_eq!(run.code, 69, "{run:?}");
    assert!(run.stderr.contains("certificate"), "{run:?}");
    // No credentials in ~/.ssh.
    let empty = tempfile::tempdir().unwrap();
    let run = client(&server, As::Home(empty.path()), cwd, &["pkgs"]).await;
    assert_eq!(run.code, 65, "{run:?}");
    assert!(run.stderr.contains("signing-ca.crt"), "{run:?}");
    // A subcommand after the flags would be sent as a path: a usage error (64).
    let run = client(&server, alice, cwd, &["--json", "keys"]).await;
    assert_eq!(run.code, 64, "{run:?}");
    // Nothing answers on this port.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let run = client(&server, alice, cwd, &["pkgs", "--port", &port]).await;
    assert_eq!(run.code, 69, "{run:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_verified_by_key_id_and_by_pem() {
    let server = TestServer::start(Options::default()).await;
    let pki = pki();
    let alice = As::Leaf(&pki.alice);
    let local = tempfile::tempdir().unwrap();
    let cwd = local.path();
    let big = cwd.join("big.bin");
    let mut file = std::fs::File::create(&big).unwrap();
    std::io::copy(&mut Generated::new(7, 5 << 20), &mut file).unwrap();
    drop(file);
    std::fs::write(cwd.join("tool.2.0.0.1.bff"), b"small").unwrap();
    std::fs::write(cwd.join("notes.txt"), b"notes").unwrap();

    // 5 MiB, streamed; checked with the library, then by the client with the key by id.
    let run = client(&server, alice, cwd, &["--upload", "big.bin"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let signed = run.signed();
    assert_eq!(signed.len(), 1, "{run:?}");
    let (name, fields) = &signed[0];
    assert_eq!(name, "big.bin");
    assert_eq!(fields.keyid, server.keyid);
    assert!(verify_file(&server, &big, fields));
    let sig = fields.signature.as_str();
    let by_id = [
        "verify",
        "big.bin",
        "--signature",
        sig,
        "--keyid",
        &server.keyid,
    ];
    let run = client(&server, alice, cwd, &by_id).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "Signature OK\n"),
        "{run:?}"
    );
    // One byte changed: bad.
    let mut content = std::fs::read(&big).unwrap();
    content[3 << 20] ^= 1;
    std::fs::write(&big, &content).unwrap();
    let run = client(&server, alice, cwd, &by_id).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (1, "Signature BAD\n"),
        "{run:?}"
    );

    // Two files on one connection, names from the flags, JSON lines.
    let run = client(
        &server,
        alice,
        cwd,
        &[
            "--upload",
            "tool.2.0.0.1.bff",
            "notes.txt",
            "--vrmf",
            "9.9.9.9",
            "--json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    assert_eq!(lines[0]["name"], "tool.2.0.0.1.bff");
    assert_eq!(lines[0]["fileset"], "tool");
    assert_eq!(lines[0]["vrmf"], "9.9.9.9");
    assert_eq!(lines[1]["name"], "notes.txt");
    assert_eq!(lines[1]["size"], 5);

    // The key from a PEM file, the signature as the second argument.
    std::fs::write(cwd.join("release.pub"), &server.public_pem).unwrap();
    let notes_sig = lines[1]["signature"].as_str().unwrap();
    let run = client(
        &server,
        alice,
        cwd,
        &[
            "verify",
            "notes.txt",
            notes_sig,
            "--public-key",
            "release.pub",
            "--json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json(), serde_json::json!({ "valid": true }));
    let run = client(
        &server,
        alice,
        cwd,
        &[
            "verify",
            "tool.2.0.0.1.bff",
            "-s",
            notes_sig,
            "--public-key",
            "release.pub",
        ],
    )
    .await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (1, "Signature BAD\n"),
        "{run:?}"
    );

    // Bad input: 65.
    for args in [
        [
            "verify",
            "notes.txt",
            "-s",
            "not base64!",
            "--keyid",
            &server.keyid,
        ],
        [
            "verify",
            "gone.bin",
            "-s",
            notes_sig,
            "--keyid",
            &server.keyid,
        ],
        [
            "verify",
            "notes.txt",
            "-s",
            notes_sig,
            "--keyid",
            "0000000000000000",
        ],
        [
            "verify",
            "notes.txt",
            "-s",
            notes_sig,
            "--public-key",
            "gone.pem",
        ],
    ] {
        let run = client(&server, alice, cwd, &args).await;
        assert_eq!(run.code, 65, "{args:?}: {run:?}");
    }
    let run = client(&server, alice, cwd, &["--upload", "gone.bin"]).await;
    assert_eq!(run.code, 65, "{run:?}");

    // carol may not sign: refused.
    let run = client(
        &server,
        As::Leaf(&pki.chained_client),
        cwd,
        &["--upload", "notes.txt"],
    )
    .await;
    assert_eq!(run.code, 77, "{run:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_listed() {
    let server = TestServer::start(Options::default()).await;
    let alice = As::Leaf(&pki().alice);
    let cwd = server.dir.path();
    let run = client(&server, alice, cwd, &["keys", "--json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let value = run.json();
    assert_eq!(value["key"], "release");
    assert_eq!(value["keys"][0]["keyid"], server.keyid.as_str());
    let run = client(&server, alice, cwd, &["keys"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let mine = run
        .stdout
        .lines()
        .find(|l| l.starts_with("* release"))
        .unwrap_or_else(|| panic!("{run:?}"));
    assert!(
        mine.contains(&server.keyid) && mine.ends_with("ed448"),
        "{mine}"
    );
    server.stop().await;
}
