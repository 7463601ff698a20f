//! The HTTP/1.1 server under the control API and the metrics endpoints.
//!
//! A small blocking server over the caller's listener: one thread per connection, one request
//! per connection (every answer says `Connection: close`), and a bound on everything a client
//! can make it hold: connections at once ([`Limits::connections_max`], more are answered 503
//! by the accept thread), the request head and body sizes (431 and 413), and the time a
//! client has to send its whole request ([`Limits::request_deadline`], 408 after it), so a
//! connection that sends nothing or a byte at a time (slowloris) holds one thread for at most
//! the deadline and never delays another request.
//!
//! Request heads are parsed by `httparse` (the parser under hyper and ureq) and status lines
//! come from `http`; what is written here is the policy above. The crates that would take the
//! whole server (tiny_http, astra) accept connections themselves, without a connection limit
//! or a read deadline, and so cannot keep the control process's properties: 503 under a flood
//! counted as the brokers' silence for no one (`docs/control-api.md`), and heartbeats
//! answered while a slow client holds a connection. Clients use `ureq` ([`crate::client`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::client::ClientError;

/// Largest request head (request line and headers) of the control API.
pub const HEAD_BYTES_MAX: usize = 8 << 10;
/// Largest request body of the control API.
pub const BODY_BYTES_MAX: usize = 64 << 10;
/// Most header fields in a request.
pub const HEADERS_MAX: usize = 32;
/// How long a client of the control API has to send its whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes read from a client at a time.
const CHUNK_BYTES: usize = 4096;
/// Bytes a client may still send after its answer (a refused oversized body) that are read
/// and dropped, so that closing does not reset the connection before the answer is read.
const DRAIN_BYTES_MAX: u64 = 1 << 20;
/// How long those bytes are waited for.
const DRAIN_WAIT: Duration = Duration::from_millis(200);
/// How long the accept thread waits after a failed accept (out of descriptors, say) before
/// it tries again, rather than spinning.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// What one server lets a client make it hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed.
    pub connections_max: usize,
    /// Largest request head; beyond it 431.
    pub head_bytes_max: usize,
    /// Largest request body; beyond it 413.
    pub body_bytes_max: usize,
    /// The whole request (head and body) must arrive within this from the connection's
    /// start; after it 408 and the connection is closed.
    pub request_deadline: Duration,
    /// Longest a write of the answer may block on a client that does not read.
    pub write_deadline: Duration,
}

impl Default for Limits {
    /// The control API's limits (`docs/control-api.md`).
    fn default() -> Self {
        Limits {
            connections_max: 256,
            head_bytes_max: HEAD_BYTES_MAX,
            body_bytes_max: BODY_BYTES_MAX,
            request_deadline: REQUEST_DEADLINE,
            write_deadline: REQUEST_DEADLINE,
        }
    }
}

/// One request, read whole.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The target without its query.
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

/// What a server does with requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. May block (a long poll): each connection has its own thread.
    fn handle(&self, req: &Request) -> Response;

    /// Called with the status of every answer written, including those to requests that
    /// could not be read (400, 408, 413, 431).
    fn answered(&self, _status: u16) {}

    /// Called from the accept thread for every connection turned away because
    /// [`Limits::connections_max`] were open.
    fn refused(&self) {}
}

/// Serves `listener` from a thread named `name` (and one thread per connection) until the
/// process exits.
pub fn spawn<H: Handler>(
    name: &str,
    listener: TcpListener,
    limits: Limits,
    handler: Arc<H>,
) -> io::Result<()> {
    let conn_name = format!("{name}-conn");
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || accept(&listener, limits, &handler, &conn_name))?;
    Ok(())
}

/// Counts a connection as open until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept<H: Handler>(listener: &TcpListener, limits: Limits, handler: &Arc<H>, name: &str) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut failing = false;
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => {
                failing = false;
                s
            }
            Err(e) => {
                if !failing {
                    log::warn!("{name}: cannot accept a connection: {e}");
                }
                failing = true;
                std::thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= limits.connections_max {
            open.fetch_sub(1, Ordering::AcqRel);
            handler.refused();
            refuse(&stream);
            continue;
        }
        let guard = Open(open.clone());
        let h = handler.clone();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _open = guard;
                connection(&*h, &limits, &stream);
            });
        if let Err(e) = spawned {
            log::error!("{name}: cannot start a connection thread: {e}");
        }
    }
}

/// Answers 503 without reading the request; never blocks the accept thread.
fn refuse(stream: &TcpStream) {
    let _ = stream.set_nonblocking(true);
    let _ = write_response(stream, &Response::error(503, "too many connections"));
}

fn connection<H: Handler>(handler: &H, limits: &Limits, stream: &TcpStream) {
    let _ = stream.set_write_timeout(Some(limits.write_deadline));
    let resp = match read_request(stream, limits) {
        Ok(req) => handler.handle(&req),
        Err(resp) => resp,
    };
    handler.answered(resp.status);
    if write_response(stream, &resp).is_err() {
        return;
    }
    // Read what the client may still be sending (a refused oversized body), so that closing
    // does not reset the connection before the client has read the answer.
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(DRAIN_WAIT));
    let _ = io::copy(&mut stream.take(DRAIN_BYTES_MAX), &mut io::sink());
}

/// Reads into `buf` what arrives before `deadline`; 408 once it has passed.
fn read_before(stream: &TcpStream, deadline: Instant, buf: &mut [u8]) -> Result<usize, Response> {
    let late = || Response::error(408, "the request did not arrive in time");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| Response::error(400, format!("cannot read the request: {e}")))?;
        match (&mut &*stream).read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(late())
            }
            Err(e) => {
                return Err(Response::error(
                    400,
                    format!("cannot read the request: {e}"),
                ))
            }
        }
    }
}

/// The parts of a complete request head the server uses.
struct Head {
    method: String,
    target: String,
    content_length: usize,
    expect_continue: bool,
}

fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, Response> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::error(
                431,
                format!("more than {HEADERS_MAX} header fields"),
            ))
        }
        Err(e) => return Err(Response::error(400, format!("malformed request head: {e}"))),
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(Response::error(400, "malformed request line"));
    };
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| {
                    Response::error(
                        400,
                        format!("bad Content-Length {:?}", String::from_utf8_lossy(h.value)),
                    )
                })?;
            if content_length.is_some_and(|m| m != n) {
                return Err(Response::error(400, "conflicting Content-Length fields"));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(
                411,
                "bodies are taken with a Content-Length only, not a Transfer-Encoding",
            ));
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    let head = Head {
        method: method.to_string(),
        target: target.to_string(),
        content_length: content_length.unwrap_or(0),
        expect_continue,
    };
    Ok(Some((head, len)))
}

/// Reads one request within `limits`; a malformed, oversized or late one is answered with
/// the error response.
pub fn read_request(stream: &TcpStream, limits: &Limits) -> Result<Request, Response> {
    let deadline = Instant::now() + limits.request_deadline;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; CHUNK_BYTES];
    let (head, head_len) = loop {
        if let Some(done) = parse_head(&buf)? {
            break done;
        }
        let room = limits.head_bytes_max - buf.len();
        if room == 0 {
            return Err(Response::error(
                431,
                format!("request head over {} bytes", limits.head_bytes_max),
            ));
        }
        let n = read_before(stream, deadline, &mut chunk[..room.min(CHUNK_BYTES)])?;
        if n == 0 {
            return Err(Response::error(
                400,
                "connection closed inside the request head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head.content_length > limits.body_bytes_max {
        return Err(Response::error(
            413,
            format!(
                "request body of {} bytes is over the {}-byte limit",
                head.content_length, limits.body_bytes_max
            ),
        ));
    }
    if head.expect_continue && buf.len() == head_len && head.content_length > 0 {
        let _ = (&mut &*stream).write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let mut body = buf.split_off(head_len);
    // One request per connection: bytes past the body are not read as another.
    body.truncate(head.content_length);
    while body.len() < head.content_length {
        let want = (head.content_length - body.len()).min(CHUNK_BYTES);
        let n = read_before(stream, deadline, &mut chunk[..want])?;
        if n == 0 {
            return Err(Response::error(
                400,
                format!(
                    "request body of {} bytes is shorter than its Content-Length {}",
                    body.len(),
                    head.content_length
                ),
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, q) = head
        .target
        .split_once('?')
        .unwrap_or((head.target.as_str(), ""));
    let query = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    Ok(Request {
        method: head.method,
        path: path.to_string(),
        query,
        body,
    })
}

/// Writes `r` as a complete HTTP/1.1 answer that closes the connection.
pub fn write_response(stream: &TcpStream, r: &Response) -> io::Result<()> {
    let reason = http::StatusCode::from_u16(r.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut w = stream;
    write!(
        w,
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        r.status,
        r.content_type,
        r.body.len(),
        r.body
    )?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicU64;

    /// Answers every request with its method and path; counts what it saw.
    #[derive(Default)]
    struct Echo {
        answered: AtomicU64,
        refused: AtomicU64,
    }

    impl Handler for Echo {
        fn handle(&self, req: &Request) -> Response {
            Response::json(
                200,
                &serde_json::json!({
                    "method": req.method,
                    "path": req.path,
                    "body": String::from_utf8_lossy(&req.body),
                }),
            )
        }
        fn answered(&self, _status: u16) {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
        fn refused(&self) {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn serve(limits: Limits) -> (SocketAddr, Arc<Echo>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = Arc::new(Echo::default());
        spawn("test-http", listener, limits, echo.clone()).unwrap();
        (addr, echo)
    }

    /// Sends `raw` and reads the whole answer: `(status, text)`.
    fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(raw).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text:?}"));
        (status, text)
    }

    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
    }

    #[test]
    fn a_request_is_read_whole_and_answered_with_connection_close() {
        let (addr, _) = serve(Limits::default());
        let (status, text) = exchange(
            addr,
            b"POST /v1/x?since=3&wait_ms= HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.contains(r#""path":"/v1/x""#), "{text}");
        assert!(text.contains(r#""body":"hello""#), "{text}");
    }

    #[test]
    fn garbage_gets_400_and_the_server_goes_on() {
        let (addr, echo) = serve(Limits::default());
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls hello\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: lots\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ] {
            let (status, text) = exchange(addr, garbage);
            assert_eq!(
                status,
                400,
                "{:?}: {text}",
                String::from_utf8_lossy(garbage)
            );
            assert!(text.contains(r#"{"error":"#), "{text}");
        }
        // Cut short: the head never ends, or the body is shorter than announced.
        for cut in [
            &b"GET / HTTP/1.1\r\nHost"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc",
        ] {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(cut).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        }
        assert_eq!(get(addr, "/still-here").0, 200);
        assert_eq!(echo.answered.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn oversized_heads_and_bodies_and_chunked_bodies_get_clear_4xx() {
        let (addr, _) = serve(Limits::default());
        let long = format!(
            "GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(HEAD_BYTES_MAX)
        );
        assert_eq!(exchange(addr, long.as_bytes()).0, 431);
        let many: String = (0..=HEADERS_MAX).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            exchange(addr, format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).0,
            431
        );
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{}",
            BODY_BYTES_MAX + 1,
            "x".repeat(BODY_BYTES_MAX + 1)
        );
        let (status, text) = exchange(addr, big.as_bytes());
        assert_eq!(status, 413, "{text}");
        assert!(text.contains("over the 65536-byte limit"), "{text}");
        let chunked =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(exchange(addr, chunked).0, 411);
        assert_eq!(get(addr, "/").0, 200);
    }

    #[test]
    fn an_expect_100_continue_request_is_told_to_go_on() {
        let (addr, _) = serve(Limits::default());
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /c HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            .unwrap();
        let mut interim = [0u8; 25];
        s.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"ok").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains(r#""body":"ok""#), "{text}");
    }

    #[test]
    fn a_slow_client_is_answered_408_at_the_deadline_while_others_are_served() {
        let deadline = Duration::from_millis(600);
        let (addr, _) = serve(Limits {
            request_deadline: deadline,
            ..Limits::default()
        });
        let start = Instant::now();
        // One that sends nothing, one that sends its head a byte at a time.
        let mut silent = TcpStream::connect(addr).unwrap();
        let mut slow = TcpStream::connect(addr).unwrap();
        let mut drip = b"GET /slow HTTP/1.1\r\n".iter();
        while start.elapsed() < deadline / 2 {
            if let Some(b) = drip.next() {
                let _ = slow.write_all(&[*b]);
            }
            let t = Instant::now();
            assert_eq!(get(addr, "/other").0, 200);
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "a request waited {:?} behind slow clients",
                t.elapsed()
            );
        }
        for s in [&mut silent, &mut slow] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
        }
        assert!(start.elapsed() >= deadline);
    }

    #[test]
    fn connections_over_the_limit_are_refused_503_and_counted() {
        let (addr, echo) = serve(Limits {
            connections_max: 2,
            ..Limits::default()
        });
        let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // The accept thread counts the held connections as they come; wait until it refuses.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            if text.starts_with("HTTP/1.1 503 ") {
                break;
            }
            assert!(Instant::now() < deadline, "never refused: {text}");
        }
        assert!(echo.refused.load(Ordering::Relaxed) >= 1);
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        // A refusal may close the connection before the request is written: that is a
        // refusal too, not a failure of the test.
        let answered = || -> Option<u16> {
            let mut s = TcpStream::connect(addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            text.split_whitespace().nth(1)?.parse().ok()
        };
        while answered() != Some(200) {
            assert!(
                Instant::now() < deadline,
                "still refusing after the holders left"
            );
        }
    }
}
