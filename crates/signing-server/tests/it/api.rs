//! The HTTPS JSON API (ALPN `http/1.1`).

use serde_json::Value;
use signing_server::ed448::{keyid, parse_public_pem, verify_stream};

use crate::support::{Options, TestServer, base64_decode, empty, full, pki, sha256_hex};

fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[tokio::test]
async fn uploads_are_signed_with_fields_from_the_name_or_the_query() {
    let server = TestServer::start(Options::default()).await;
    let key = parse_public_pem(&server.public_pem).unwrap();
    let content = b"the libc fileset".to_vec();

    let reply = server
        .alice(
            "POST",
            "/v1/sign?name=bos.rte.libc.7.3.2.1.bff",
            full(content.clone()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let signed = reply.json();
    for (field, value) in [
        ("name", "bos.rte.libc.7.3.2.1.bff"),
        ("package", "bos"),
        ("fileset", "bos.rte.libc"),
        ("vrmf", "7.3.2.1"),
        ("ftype", "I"),
        ("keyid", &server.keyid),
        ("sha256", &sha256_hex(&content)),
    ] {
        assert_eq!(signed[field], value, "{field}: {signed}");
    }
    assert_eq!(signed["size"], content.len());
    let signature = base64_decode(signed["signature"].as_str().unwrap());
    assert!(verify_stream(&key, &signature, &content[..]).unwrap());

    // The query wins over the name.
    let reply = server
        .alice(
            "POST",
            "/v1/sign?name=bos.rte.libc.7.3.2.1.bff&vrmf=1.2.3.4&ftype=S",
            full(content.clone()),
        )
        .await;
    let signed = reply.json();
    assert_eq!(
        (&signed["fileset"], &signed["vrmf"], &signed["ftype"]),
        (
            &Value::from("bos.rte.libc"),
            &Value::from("1.2.3.4"),
            &Value::from("S")
        )
    );
    let reply = server
        .alice(
            "POST",
            "/v1/sign?name=tool.tar&package=tools&fileset=tools.base&vrmf=2.0.0.0",
            full(&b"tool"[..]),
        )
        .await;
    let signed = reply.json();
    assert_eq!(
        (&signed["package"], &signed["fileset"], &signed["vrmf"]),
        (
            &Value::from("tools"),
            &Value::from("tools.base"),
            &Value::from("2.0.0.0")
        )
    );

    // An empty upload is content like any other.
    let reply = server.alice("POST", "/v1/sign?name=empty", empty()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["size"], 0);

    for bad in [
        "/v1/sign?name=a%2Fb.bff",
        "/v1/sign?name=..%2F..%2Fetc%2Fpasswd",
        "/v1/sign?name=",
        "/v1/sign",
        "/v1/sign?name=x.bin&vrmf=1%3A2",
        "/v1/sign?name=x.bin&package=a%0Ab",
    ] {
        let reply = server.alice("POST", bad, full(&b"x"[..])).await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.text());
        assert!(reply.json()["error"].is_string(), "{bad}");
    }
    assert_eq!(server.service.audit.rows().await.unwrap().len(), 4);
}

#[tokio::test]
async fn sign_path_returns_the_report() {
    let server = TestServer::start(Options::default()).await;
    let dir = server.pkgs.join("lpp");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("bos.rte.7.3.0.0.bff"), b"bos").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    let path = dir.to_str().unwrap();
    let body = serde_json::json!({ "path": path }).to_string();
    let reply = server.alice("POST", "/v1/sign-path", full(body)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json();
    assert_eq!(report["path"], path);
    assert_eq!(report["directory"], true);
    assert_eq!(
        report["listing"],
        serde_json::json!(["bos.rte.7.3.0.0.bff", "sub"])
    );
    assert_eq!(report["not_signed"], serde_json::json!([]));
    assert_eq!(
        report["signatures_file"],
        server.signatures_file().to_str().unwrap()
    );
    let fields = &report["files"]["bos.rte.7.3.0.0.bff"];
    assert_eq!(fields["fileset"], "bos.rte");
    assert_eq!(fields["keyid"], server.keyid.as_str());

    for (body, status) in [
        (serde_json::json!({ "path": "/etc" }).to_string(), 403),
        (
            serde_json::json!({ "path": server.bobs.to_str().unwrap() }).to_string(),
            403,
        ),
        (
            serde_json::json!({ "path": format!("{path}/missing") }).to_string(),
            404,
        ),
        (serde_json::json!({ "path": "relative" }).to_string(), 400),
        (serde_json::json!({ "file": path }).to_string(), 400),
        ("not json".to_owned(), 400),
        ("x".repeat(70_000), 413),
    ] {
        let reply = server
            .alice("POST", "/v1/sign-path", full(body.clone()))
            .await;
        assert_eq!(
            reply.status,
            status,
            "{}: {}",
            &body[..body.len().min(80)],
            reply.text()
        );
        assert!(reply.json()["error"].is_string());
    }
    assert_eq!(server.service.audit.rows().await.unwrap().len(), 1);
}

#[tokio::test]
async fn keys_public_keys_and_verify() {
    let server = TestServer::start(Options::default()).await;
    let reply = server.alice("GET", "/v1/keys", empty()).await;
    assert_eq!(reply.status, 200);
    let keys = reply.json();
    assert_eq!(keys["key"], "release");
    assert_eq!(keys["keys"][0]["keyid"], server.keyid.as_str());
    assert_eq!(keys["keys"][0]["algorithm"], "ed448");

    let reply = server
        .alice("GET", &format!("/v1/keys/{}", server.keyid), empty())
        .await;
    assert_eq!(reply.status, 200);
    let public = parse_public_pem(&reply.text()).unwrap();
    assert_eq!(keyid(&public), server.keyid);
    assert_eq!(reply.text(), server.public_pem);
    for unknown in ["unknown", "0123456789abcdef", ""] {
        let reply = server
            .alice("GET", &format!("/v1/keys/{unknown}"), empty())
            .await;
        assert_eq!(reply.status, 404, "{unknown:?}");
    }

    let content = b"verify me".to_vec();
    let signed = server
        .alice("POST", "/v1/sign?name=v.bin", full(content.clone()))
        .await
        .json();
    let signature = signed["signature"].as_str().unwrap();
    let uri = |keyid: &str, signature: &str| {
        format!(
            "/v1/verify?keyid={}&signature={}",
            encode(keyid),
            encode(signature)
        )
    };
    let reply = server
        .alice(
            "POST",
            &uri(&server.keyid, signature),
            full(content.clone()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["valid"], true);
    let reply = server
        .alice(
            "POST",
            &uri(&server.keyid, signature),
            full(&b"verify mE"[..]),
        )
        .await;
    assert_eq!(reply.json()["valid"], false);
    let reply = server
        .alice(
            "POST",
            &uri("0123456789abcdef", signature),
            full(content.clone()),
        )
        .await;
    assert_eq!(reply.status, 404);
    let reply = server
        .alice("POST", &uri(&server.keyid, "not base64!"), full(content))
        .await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn unknown_endpoints_methods_and_identities() {
    let server = TestServer::start(Options::default()).await;
    std::fs::write(server.pkgs.join("p.bin"), b"p").unwrap();
    for (method, uri, status) in [
        ("GET", "/", 404),
        ("GET", "/v2/sign", 404),
        ("POST", "/v1/signs", 404),
        ("GET", "/v1/sign", 405),
        ("DELETE", "/v1/keys", 405),
    ] {
        let reply = server.alice(method, uri, empty()).await;
        assert_eq!(reply.status, status, "{method} {uri}: {}", reply.text());
        assert!(reply.json()["error"].is_string());
    }

    // carol's certificate is valid (through the intermediate) but no rule names her.
    let carol = Some(&pki().chained_client);
    let reply = server
        .https(carol, "POST", "/v1/sign?name=x.bin", full(&b"x"[..]))
        .await
        .unwrap();
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(reply.json()["error"].as_str().unwrap().contains("carol"));
    let body = serde_json::json!({ "path": server.pkgs.to_str().unwrap() }).to_string();
    let reply = server
        .https(carol, "POST", "/v1/sign-path", full(body))
        .await
        .unwrap();
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(server.service.audit.rows().await.unwrap().is_empty());
}
