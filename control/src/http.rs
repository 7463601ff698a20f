//! A small HTTP/1.1 server and client over std sockets, enough for the control API: one
//! request per connection, JSON bodies, explicit limits on every size.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest request head (request line and headers).
pub const HEAD_BYTES_MAX: usize = 8 << 10;
/// Largest request body.
pub const BODY_BYTES_MAX: usize = 64 << 10;

#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, content type, body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: v.to_string(),
        }
    }

    /// `{"error": msg}`; `msg` is any message or typed error.
    pub fn error(status: u16, msg: impl std::fmt::Display) -> Response {
        Response::json(status, &serde_json::json!({ "error": msg.to_string() }))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Reads one request; a malformed or oversized one is answered with the error response.
pub fn read_request(stream: &TcpStream) -> Result<Request, Response> {
    let mut r = BufReader::new(stream.take((HEAD_BYTES_MAX + BODY_BYTES_MAX + 1) as u64));
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| Response::error(400, format!("cannot read the request: {e}")))?;
        if n == 0 {
            return Err(Response::error(
                400,
                "connection closed inside the request head",
            ));
        }
        head.extend_from_slice(&line);
        if head.len() > HEAD_BYTES_MAX {
            return Err(Response::error(
                413,
                format!("request head over {HEAD_BYTES_MAX} bytes"),
            ));
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let head =
        String::from_utf8(head).map_err(|_| Response::error(400, "request head is not UTF-8"))?;
    let mut lines = head.lines();
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(Response::error(
            400,
            format!("malformed request line {first:?}"),
        ));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Response::error(
            400,
            format!("unsupported protocol {version:?}"),
        ));
    }
    let mut content_length = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().map_err(|_| {
                    Response::error(400, format!("bad Content-Length {:?}", v.trim()))
                })?;
            }
        }
    }
    if content_length > BODY_BYTES_MAX {
        return Err(Response::error(
            413,
            format!(
                "request body of {content_length} bytes is over the {BODY_BYTES_MAX}-byte limit"
            ),
        ));
    }
    let mut body = vec![0; content_length];
    r.read_exact(&mut body).map_err(|e| {
        Response::error(
            400,
            format!("request body shorter than its Content-Length: {e}"),
        )
    })?;
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query,
        body,
    })
}

pub fn write_response(mut stream: &TcpStream, r: &Response) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len(),
        r.body
    )?;
    stream.flush()
}

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the control process at {addr}: {source} (is `embar control` running?)")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control process at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control process at {addr} sent a malformed response: {detail}")]
    Malformed { addr: SocketAddr, detail: String },
    #[error("{message}")]
    Api { status: u16, message: String },
}

/// Sends one request and reads the response: `(status, body)`.
pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), ClientError> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|source| ClientError::Unreachable { addr, source })?;
    let io = |source| ClientError::Io { addr, source };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let body = body.unwrap_or("");
    let mut w = &stream;
    write!(
        w,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(io)?;
    let mut text = String::new();
    (&stream).read_to_string(&mut text).map_err(io)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::Malformed {
            addr,
            detail: "no end of head".into(),
        })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Malformed {
            addr,
            detail: format!("status line {:?}", head.lines().next()),
        })?;
    Ok((status, body.to_string()))
}
