//! The HTTPS JSON API (ALPN `http/1.1`).
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/sign?name=N[&package=&fileset=&vrmf=&ftype=]`, body = the content | 200 `{name, size, sha256, keyid, package, fileset, vrmf, ftype, timestamp, signature}` |
//! | `POST /v1/sign-path`, body `{"path": "/abs/path"}` | 200 `{path, directory, listing, files, not_signed, signatures_file}` |
//! | `GET /v1/keys` | 200 `{keys: [{name, keyid, algorithm, public_key}], key: <the caller's key name>}` |
//! | `GET /v1/keys/{keyid}` | 200 the PEM public key |
//! | `POST /v1/verify?keyid=K&signature=B64`, body = the content | 200 `{valid, keyid}` |
//!
//! Errors are `{"error": "..."}` with 400, 403, 404, 405, 408, 413 or 500. Uploads
//! are streamed to a spool file (bounded memory, any size up to `max_upload_bytes`), then
//! signed from it; content to verify is spooled the same way and read once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use common::daemon::Shutdown;
use common::tls::LivePeer;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::audit::Record;
use crate::fields::Names;
use crate::service::{Refusal, Service};
use crate::signer::{Content, SignError, Signer};
use crate::spool::{SpoolError, SpoolFile};

type Answer = Response<Full<Bytes>>;

/// Uploads up to this size (by Content-Length) are signed from memory.
const IN_MEMORY_UPLOAD: u64 = 1 << 20;

/// Serves HTTP/1.1 on one TLS connection, until the peer closes, shutdown, or the
/// connection reaches `max_connection_age_secs` (then it ends after the current request).
pub async fn serve<S>(
    service: Arc<Service>,
    io: S,
    cn: Option<String>,
    live: LivePeer,
    shutdown: Shutdown,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = service.config.limits.clone();
    let max_age = service.config.tls.max_connection_age();
    let handler = hyper::service::service_fn(move |req| {
        let service = service.clone();
        let cn = cn.clone();
        let live = live.clone();
        async move {
            let started = tokio::time::Instant::now();
            let route = crate::metrics::route(req.method(), req.uri().path());
            // Before each request: a certificate revoked since the handshake acts no more.
            let answer = if let Err(err) = live.check() {
                tracing::warn!(outcome = "refused", identity = ?cn, %err, "request refused");
                let mut answer = refused(&Refusal::new(403, err.to_string()));
                answer
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                answer
            } else {
                handle(&service, cn.as_deref(), req).await
            };
            let status = answer.status().as_u16();
            service.metrics.answered(route, status, started.elapsed());
            Ok::<_, Infallible>(answer)
        }
    });
    // A client that stops reading its answer is cut off after io_timeout_secs without
    // progress, like the original protocol's writes (hyper times only the request head).
    let io = common::io::WriteDeadline::new(io, limits.io_timeout());
    let http = common::daemon::Http1 {
        header_timeout: limits.request_timeout(),
        max_buf_size: None,
        max_age: Some(max_age),
        drain: limits.drain_grace(),
    };
    common::daemon::serve_http1(
        io,
        handler,
        http,
        &shutdown,
        std::future::pending(),
        std::future::pending(),
    )
    .await;
}

fn json_answer(status: u16, value: &Value) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn refused(refusal: &Refusal) -> Answer {
    json_answer(refusal.status, &json!({ "error": refusal.message }))
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

async fn handle(service: &Arc<Service>, cn: Option<&str>, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_owned();
    let result = match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/sign") => sign_upload(service, cn, req).await,
        (&Method::POST, "/v1/sign-path") => sign_path(service, cn, req).await,
        (&Method::GET, "/v1/keys") => keys(service, cn),
        (&Method::POST, "/v1/verify") => verify(service, cn, req).await,
        (&Method::GET, p) if p.starts_with("/v1/keys/") => {
            key_pem(service, &p["/v1/keys/".len()..])
        }
        (_, "/v1/sign" | "/v1/sign-path" | "/v1/keys" | "/v1/verify") => {
            Err(Refusal::new(405, "method not allowed"))
        }
        _ => Err(Refusal::new(404, format!("no such endpoint: {path}"))),
    };
    result.unwrap_or_else(|refusal| refused(&refusal))
}

/// 413 for an upload over `max` bytes.
/// The body's announced length (Content-Length), refused before it is read when over `max`.
fn announced_length(req: &Request<Incoming>, max: u64) -> Result<Option<u64>, Refusal> {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    Ok(announced)
}

fn too_large(max: u64) -> Refusal {
    Refusal::new(413, format!("the upload is larger than {max} bytes"))
}

/// A request body read under two deadlines: no piece may take longer than
/// `io_timeout_secs`, and the whole body must keep up with `min_upload_bytes_per_sec` after
/// its first `io_timeout_secs` (see [`crate::config::Limits::body_allowance`]), so a body
/// trickled one byte a minute is cut off.
struct Body<'a> {
    service: &'a Service,
    body: Incoming,
    started: tokio::time::Instant,
    received: u64,
}

impl<'a> Body<'a> {
    fn new(service: &'a Service, body: Incoming) -> Self {
        Self {
            service,
            body,
            started: tokio::time::Instant::now(),
            received: 0,
        }
    }

    /// The next piece (`None` at the end).
    ///
    /// # Errors
    /// 408 when a piece stalls or the body falls behind the minimum rate, 400 when the
    /// body cannot be read.
    async fn next(&mut self) -> Result<Option<Bytes>, Refusal> {
        let limits = &self.service.config.limits;
        loop {
            let allowed = self.started + limits.body_allowance(self.received);
            let stall = tokio::time::Instant::now() + limits.io_timeout();
            let deadline = allowed.min(stall);
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) if deadline == allowed => {
                    return Err(Refusal::new(
                        408,
                        format!(
                            "the upload is slower than {} bytes/s (min_upload_bytes_per_sec)",
                            limits.min_upload_bytes_per_sec
                        ),
                    ));
                }
                Err(_) => return Err(Refusal::new(408, "the upload stalled")),
                Ok(None) => return Ok(None),
                Ok(Some(Err(err))) => {
                    return Err(Refusal::new(400, format!("reading the upload: {err}")));
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.received += data.len() as u64;
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// A spool error as an answer: 507 when the spool or the disk is full.
fn spool_refusal(err: SpoolError) -> Refusal {
    match err {
        SpoolError::Full(why) => Refusal::new(507, why),
        SpoolError::Io(err) => Refusal::new(500, format!("the spool: {err}")),
    }
}

/// Streams the body into a fresh spool file named `name`, within the upload limit and the
/// spool's quota.
async fn spool(service: &Service, body: Incoming, name: &str) -> Result<SpoolFile, Refusal> {
    let limits = &service.config.limits;
    let mut file = service
        .spool
        .create(".upload-", name)
        .map_err(spool_refusal)?;
    let mut body = Body::new(service, body);
    let mut pending = bytes::BytesMut::new();
    while let Some(data) = body.next().await? {
        if body.received > limits.max_upload_bytes {
            return Err(too_large(limits.max_upload_bytes));
        }
        pending.extend_from_slice(&data);
        if pending.len() >= 1 << 20 {
            file = write_spool(file, pending.split().freeze()).await?;
        }
    }
    if !pending.is_empty() {
        file = write_spool(file, pending.freeze()).await?;
    }
    Ok(file)
}

/// Appends to a spool file on a blocking thread.
async fn write_spool(mut file: SpoolFile, data: Bytes) -> Result<SpoolFile, Refusal> {
    tokio::task::spawn_blocking(move || file.write(&data).map(|()| file))
        .await
        .map_err(|e| Refusal::new(500, e.to_string()))?
        .map_err(spool_refusal)
}

async fn sign_upload(
    service: &Arc<Service>,
    cn: Option<&str>,
    req: Request<Incoming>,
) -> Result<Answer, Refusal> {
    let (_, signer) = service.authorize(cn)?;
    let params = query(&req);
    let name = params
        .get("name")
        .cloned()
        .filter(|n| {
            !n.is_empty() && n.len() <= 1024 && !n.contains('/') && !n.contains(char::is_control)
        })
        .ok_or_else(|| {
            Refusal::new(
                400,
                "?name= (the file name: no '/', no control characters) is required",
            )
        })?;
    let names = Names {
        package: params.get("package").cloned(),
        fileset: params.get("fileset").cloned(),
        vrmf: params.get("vrmf").cloned(),
        ftype: params.get("ftype").cloned(),
    };
    if let Some(field) = names.invalid() {
        return Err(Refusal::new(
            400,
            format!("{field} holds ':' or a line break, or is too long"),
        ));
    }
    // Small bodies (by Content-Length) are signed from memory; the rest are spooled to disk.
    // hyper ends a body at its Content-Length, so one announced over the limit is refused
    // before it is read, and one within it cannot grow past it.
    let max = service.config.limits.max_upload_bytes;
    let announced = announced_length(&req, max)?;
    let small = announced.is_some_and(|n| n <= IN_MEMORY_UPLOAD);
    let content = if small {
        let mut body = Body::new(service, req.into_body());
        let mut content = bytes::BytesMut::new();
        while let Some(data) = body.next().await? {
            if (content.len() + data.len()) as u64 > max.min(IN_MEMORY_UPLOAD) {
                return Err(too_large(max));
            }
            content.extend_from_slice(&data);
        }
        Content::Memory(content.freeze())
    } else {
        Content::Private(spool(service, req.into_body(), &name).await?)
    };
    let signed = service
        .sign(cn, signer, content, &name, &names)
        .await
        .map_err(|e| match e {
            SignError::Spool(err) => spool_refusal(err),
            other => Refusal::new(500, other.to_string()),
        })?;
    service
        .record(&[Record {
            identity: cn.unwrap_or("-").to_owned(),
            source: "upload",
            name: name.clone(),
            sha256: signed.sha256.clone(),
            size: signed.size,
            key_name: signer.name().to_owned(),
            fields: signed.fields.clone(),
        }])
        .await?;
    let f = &signed.fields;
    Ok(json_answer(
        200,
        &json!({
            "name": name,
            "size": signed.size,
            "sha256": signed.sha256,
            "keyid": f.keyid,
            "package": f.package,
            "fileset": f.fileset,
            "vrmf": f.vrmf,
            "ftype": f.ftype,
            "timestamp": f.timestamp,
            "signature": f.signature,
        }),
    ))
}

async fn small_json(service: &Service, body: Incoming) -> Result<Value, Refusal> {
    let max = service.config.limits.max_json_bytes;
    let collected = tokio::time::timeout(
        service.config.limits.io_timeout(),
        http_body_util::Limited::new(body, max).collect(),
    )
    .await
    .map_err(|_| Refusal::new(408, "the request body stalled"))?
    .map_err(|_| Refusal::new(413, format!("the request body is over {max} bytes")))?;
    serde_json::from_slice(&collected.to_bytes())
        .map_err(|e| Refusal::new(400, format!("the body is not JSON: {e}")))
}

async fn sign_path(
    service: &Arc<Service>,
    cn: Option<&str>,
    req: Request<Incoming>,
) -> Result<Answer, Refusal> {
    let body = small_json(service, req.into_body()).await?;
    let path = body
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::new(400, "{\"path\": \"/absolute/path\"} is required"))?;
    let report = service.sign_path(cn, path).await?;
    Ok(json_answer(
        200,
        &serde_json::to_value(&report).unwrap_or_default(),
    ))
}

fn key_view(signer: &Signer) -> Value {
    json!({
        "name": signer.name(),
        "keyid": signer.keyid(),
        "algorithm": signer.algorithm(),
        "public_key": signer.public_pem().is_some(),
    })
}

fn keys(service: &Arc<Service>, cn: Option<&str>) -> Result<Answer, Refusal> {
    let mine = service.authorize(cn).ok().map(|(_, s)| s.name().to_owned());
    let keys: Vec<Value> = service.signers().iter().map(key_view).collect();
    Ok(json_answer(200, &json!({ "keys": keys, "key": mine })))
}

fn key_pem(service: &Arc<Service>, keyid: &str) -> Result<Answer, Refusal> {
    let pem = service
        .signers()
        .iter()
        .find(|s| s.keyid() == keyid)
        .and_then(Signer::public_pem)
        .ok_or_else(|| Refusal::new(404, format!("no public key with id {keyid}")))?;
    let mut response = Response::new(Full::new(Bytes::from(pem)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    Ok(response)
}

async fn verify(
    service: &Arc<Service>,
    cn: Option<&str>,
    req: Request<Incoming>,
) -> Result<Answer, Refusal> {
    let params = query(&req);
    let keyid = params
        .get("keyid")
        .cloned()
        .ok_or_else(|| Refusal::new(400, "?keyid= is required"))?;
    let signature = params
        .get("signature")
        .and_then(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .ok()
        })
        .ok_or_else(|| Refusal::new(400, "?signature= (base64) is required"))?;
    let key = service
        .signers()
        .iter()
        .find_map(|s| match s {
            Signer::Ed448 { key, .. } if s.keyid() == keyid => Some(key.verifying_key()),
            _ => None,
        })
        .ok_or_else(|| {
            Refusal::new(
                404,
                format!("no Ed448 key with id {keyid} (command-signed content is verified with the command's own tools)"),
            )
        })?;
    // Identities that may not sign get a small budget: verifying is hashing the body.
    let limits = &service.config.limits;
    let max = if service.authorize(cn).is_ok() {
        limits.max_verify_bytes
    } else {
        limits.max_verify_bytes_without_rule
    };
    announced_length(&req, max)?;
    // Hashed as it arrives: content to verify never touches the disk.
    let mut verifier = crate::ed448::StreamVerifier::new(&key, &signature);
    let mut body = Body::new(service, req.into_body());
    while let Some(data) = body.next().await? {
        if body.received > max {
            return Err(too_large(max));
        }
        verifier.update(&data);
    }
    let valid = verifier.finish();
    Ok(json_answer(200, &json!({ "valid": valid, "keyid": keyid })))
}
