//! Our client against a server that frames answers like the stock original (blank lines
//! between tokens, no closing `.E`, plain `Content-Length` answers for /auth) and that can
//! only take single-token uploads (`--single-token-upload`).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use remo_serv::client::{Client, ClientConfig};
use remo_serv::keys::{PrivateKey, PublicKey};
use remo_serv::proto::{self, AuthRequest, Cipher, Magic, TokenHeader};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct Original {
    cipher: Mutex<Option<Cipher>>,
    uploaded: Mutex<Vec<(bool, Vec<u8>)>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Three pieces, framed as the original server does: `T0\r\n\r\nT1\r\n\r\nT2\r\n`.
const PIECES: [&[u8]; 3] = [b"first piece,", b" second piece,", b" last piece"];

async fn handle(
    state: Arc<Original>,
    server_key: Arc<PrivateKey>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let has_length = req.headers().contains_key("content-length");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let cookie = ("set-cookie", "SESSION_ID=origid");
    if path == "/auth" {
        if body.is_empty() {
            return Ok(hyper::Response::new(
                Full::new(Bytes::from("Disconnected")).boxed(),
            ));
        }
        let request = AuthRequest::parse(&body).unwrap();
        let secret = proto::x448_secret();
        let public = proto::x448_public(&secret);
        let shared = proto::x448_shared(&secret, &request.key).unwrap();
        *state.cipher.lock().unwrap() = Some(Cipher::new(&proto::session_key(&shared)));
        let text = proto::auth_response(&public, &server_key.sign(&public));
        let mut response = hyper::Response::new(Full::new(Bytes::from(text)).boxed());
        response
            .headers_mut()
            .insert(cookie.0, cookie.1.parse().unwrap());
        return Ok(response);
    }
    let cipher = state.cipher.lock().unwrap().clone().unwrap();
    let text = std::str::from_utf8(&body).unwrap();
    let plain = cipher.decrypt_body(text.trim(), now()).unwrap();
    let (header, rest) = TokenHeader::split(&plain).unwrap();
    let (_, payload) = proto::split_hash(rest).unwrap();
    let req_no = header.req_no;
    let tokens: Vec<Vec<u8>> = if path.starts_with("/get/") {
        PIECES
            .iter()
            .enumerate()
            .map(|(tok, piece)| {
                let magic = Magic {
                    first: tok == 0,
                    last: false,
                };
                proto::response_plain(magic, req_no, tok as i16, piece)
            })
            .collect()
    } else {
        // /put: remember whether the upload came as one Content-Length token.
        state
            .uploaded
            .lock()
            .unwrap()
            .push((has_length && header.is_last(), payload.to_vec()));
        vec![proto::response_plain(
            Magic {
                first: true,
                last: true,
            },
            req_no,
            0,
            b"",
        )]
    };
    let mut framed = String::new();
    for (i, token) in tokens.iter().enumerate() {
        if i > 0 {
            framed.push_str("\r\n");
        }
        framed.push_str(&cipher.encrypt(token));
        framed.push_str("\r\n");
    }
    // No Content-Length: chunked, as the original's encrypted answers.
    let stream = futures_util::stream::once(async move { Ok(Frame::data(Bytes::from(framed))) });
    let mut response = hyper::Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response
        .headers_mut()
        .insert(cookie.0, cookie.1.parse().unwrap());
    Ok(response)
}

#[tokio::test]
async fn client_reads_original_framing_and_uploads_as_one_token() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Original::default());
    let server_key = Arc::new(PrivateKey::generate());
    let server_pub = PublicKey::Ed448(Box::new(server_key.verifying_key()));
    {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let state = Arc::clone(&state);
                let key = Arc::clone(&server_key);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(Arc::clone(&state), Arc::clone(&key), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    let config = ClientConfig {
        url: format!("http://{addr}").parse().unwrap(),
        user: "alice".into(),
        ca: None,
        single_token_upload: true,
        timeout: Duration::from_secs(10),
    };
    let mut client = Client::login(config, PrivateKey::generate(), server_pub)
        .await
        .unwrap();

    // Blank lines between tokens are skipped and the missing `.E` is accepted: the file is
    // exactly the pieces (the original client would have inserted CRLFs).
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("got");
    let bytes = client.get("remote", &local, |_, _| {}).await.unwrap();
    assert_eq!(std::fs::read(&local).unwrap(), PIECES.concat());
    assert_eq!(bytes, PIECES.concat().len() as u64);

    // With --single-token-upload the body is one Content-Length token holding the file.
    let upload = dir.path().join("up");
    std::fs::write(&upload, vec![7u8; 100_000]).unwrap();
    client.put(&upload, "remote", |_| {}).await.unwrap();
    let uploaded = state.uploaded.lock().unwrap().clone();
    assert_eq!(uploaded.len(), 1);
    assert!(
        uploaded[0].0,
        "the upload was not a single Content-Length token"
    );
    assert_eq!(uploaded[0].1, vec![7u8; 100_000]);
}
