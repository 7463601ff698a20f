//! The C ABI of Embarcadero (`libembar`, header `include/embar.h`), over the client library
//! `embar-client`: a client (the cluster, found through its control process), publishers
//! and subscribers of a topic, as opaque handles.
//!
//! Conventions, for every function:
//!
//! - It returns an [`EmbarStatus`]; `EMBAR_STATUS_OK` (0) is success. After any other
//!   status, [`embar_last_error`] returns a message saying what failed: per thread, valid
//!   until the next call into the library on that thread.
//! - No Rust panic crosses the boundary: every entry point catches one and returns
//!   `EMBAR_STATUS_PANIC`.
//! - Ownership: a handle written to an `out` pointer belongs to the caller, who frees it with
//!   its `_free` function exactly once (freeing NULL does nothing). Publishers and
//!   subscribers own what they use: they may outlive the client that opened them. Strings
//!   passed in are read during the call only. Pointers returned (messages, error text) are
//!   borrowed, valid as each function says.
//! - Threads: a client may be used by several threads at once; a publisher or subscriber by
//!   one thread at a time (it may move between threads).

#![deny(unsafe_op_in_unsafe_fn)]

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use embar_client::{Client, Error, ErrorKind, Message, Publisher, StartAt, Subscriber, TopicSpec};

/// What a call did. `EMBAR_STATUS_OK` is 0; `EMBAR_STATUS_AGAIN` is not a failure (nothing
/// was there yet); every other status is a failure that `embar_last_error()` describes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbarStatus {
    Ok = 0,
    /// Nothing yet (no message within the timeout): call again.
    Again = 1,
    /// A NULL or malformed argument, a bad setting, a message too large for a batch.
    InvalidArgument = 2,
    /// What was named does not exist: a topic, the pool, a cluster description.
    NotFound = 3,
    /// The control process or a broker cannot be reached, or has nothing free.
    Unavailable = 4,
    /// Waiting ran out (acknowledgements, log space): retrying later may succeed.
    TimedOut = 5,
    /// A broker rejected a batch of this publisher, or a delivered batch cannot be read.
    Rejected = 6,
    /// The subscriber fell behind the retention limit: open a new one.
    FellBehind = 7,
    /// The library panicked (a bug); the handle it was called with should be freed.
    Panic = 8,
    Other = 9,
    /// The pool's file lost its bytes under this process (truncated or replaced): the
    /// cluster has to be started again, and every handle on it opened anew.
    PoolLost = 10,
    /// The pool cannot be used as it is: a file that is no pool, another layout version,
    /// sizes that disagree, a damaged layout.
    BadPool = 11,
}

/// Where a subscriber starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbarStart {
    /// The oldest message still retained.
    Oldest = 0,
    /// The next message to be ordered.
    Latest = 1,
    /// The message whose total order is given.
    TotalOrder = 2,
}

/// A connection to a cluster (opaque).
pub struct EmbarClient {
    inner: Client,
}

/// A publisher of one topic (opaque).
pub struct EmbarPublisher {
    inner: Publisher,
}

/// A subscriber of one topic (opaque).
pub struct EmbarSubscriber {
    inner: Subscriber,
    /// The message last returned, which `EmbarMessage::payload` points into.
    last: Option<Message>,
}

/// One message, as `embar_subscriber_next` fills it. `payload` points into the subscriber:
/// valid until the next call with that subscriber, or its free.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EmbarMessage {
    /// Its place in the topic's total order.
    pub total_order: u64,
    /// The publisher that sent it.
    pub client_id: u64,
    /// Its batch's sequence among that publisher's batches.
    pub batch_seq: u64,
    /// Its index in the batch, and the batch's message count.
    pub index: u32,
    pub num_msg: u32,
    pub payload: *const u8,
    pub payload_len: usize,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A NUL inside a message would cut it short: shown as a space instead.
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

fn status_of(e: &Error) -> EmbarStatus {
    match e.kind() {
        ErrorKind::InvalidInput => EmbarStatus::InvalidArgument,
        ErrorKind::NotFound => EmbarStatus::NotFound,
        ErrorKind::Unavailable => EmbarStatus::Unavailable,
        ErrorKind::TimedOut => EmbarStatus::TimedOut,
        ErrorKind::Rejected => EmbarStatus::Rejected,
        ErrorKind::FellBehind => EmbarStatus::FellBehind,
        ErrorKind::PoolLost => EmbarStatus::PoolLost,
        ErrorKind::BadPool => EmbarStatus::BadPool,
        ErrorKind::Other => EmbarStatus::Other,
        // `ErrorKind` is non-exhaustive: a kind added to the library is `Other` here until
        // it is given a status of its own.
        _ => EmbarStatus::Other,
    }
}

/// A failure of a call: its status and message.
struct Failure(EmbarStatus, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure(status_of(&e), e.to_string())
    }
}

fn invalid(what: impl Into<String>) -> Failure {
    Failure(EmbarStatus::InvalidArgument, what.into())
}

/// Runs one entry point: its failure or panic becomes a status and the thread's last
/// error.
fn guard(f: impl FnOnce() -> Result<EmbarStatus, Failure>) -> EmbarStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(status)) => status,
        Ok(Err(Failure(status, message))) => {
            set_last_error(&message);
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            set_last_error(&format!("the library panicked (a bug): {what}"));
            EmbarStatus::Panic
        }
    }
}

/// The string at `p`, or why it cannot be read.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid during the call.
unsafe fn text<'a>(p: *const c_char, name: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(invalid(format!("`{name}` is NULL")));
    }
    // SAFETY: not NULL, and NUL-terminated and valid during the call (the caller's
    // contract).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| invalid(format!("`{name}` is not UTF-8: {e}")))
}

/// The handle at `p`, or an error naming it when NULL.
///
/// # Safety
/// `p` is NULL or a live handle of this type, not used by another thread during the call.
unsafe fn handle<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: a live handle that nobody else uses during the call (the caller's contract).
    unsafe { p.as_mut() }.ok_or_else(|| invalid(format!("`{name}` is NULL")))
}

/// Writes `v` to `out` if `out` is not NULL.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, v: T) {
    if !out.is_null() {
        // SAFETY: not NULL, and writable (the caller's contract).
        unsafe { out.write(v) };
    }
}

/// Moves `v` to the heap and writes the handle to `out`.
///
/// # Safety
/// `out` is valid for a write of a pointer (checked for NULL here).
unsafe fn give<T>(out: *mut *mut T, v: T) -> Result<EmbarStatus, Failure> {
    if out.is_null() {
        return Err(invalid("`out` is NULL"));
    }
    // SAFETY: not NULL, and writable (the caller's contract). The box is the caller's
    // until its `_free` function takes it back.
    unsafe { out.write(Box::into_raw(Box::new(v))) };
    Ok(EmbarStatus::Ok)
}

/// Frees a handle made by `give` (NULL: nothing).
///
/// # Safety
/// `p` is NULL or a handle from `give` of this type, not freed before and not used after.
unsafe fn take<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: made by `Box::into_raw` in `give`, freed once (the caller's contract).
        drop(unsafe { Box::from_raw(p) });
    }
}

/// The message of the last failure on this thread ("" if none). Valid until the next call
/// into the library on this thread; owned by the library.
#[no_mangle]
pub extern "C" fn embar_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ptr())).unwrap_or(c"".as_ptr())
}

/// The name of a status (`"EMBAR_STATUS_NOT_FOUND"`, ...): a static string.
#[no_mangle]
pub extern "C" fn embar_status_name(status: EmbarStatus) -> *const c_char {
    let name = match status {
        EmbarStatus::Ok => c"EMBAR_STATUS_OK",
        EmbarStatus::Again => c"EMBAR_STATUS_AGAIN",
        EmbarStatus::InvalidArgument => c"EMBAR_STATUS_INVALID_ARGUMENT",
        EmbarStatus::NotFound => c"EMBAR_STATUS_NOT_FOUND",
        EmbarStatus::Unavailable => c"EMBAR_STATUS_UNAVAILABLE",
        EmbarStatus::TimedOut => c"EMBAR_STATUS_TIMED_OUT",
        EmbarStatus::Rejected => c"EMBAR_STATUS_REJECTED",
        EmbarStatus::FellBehind => c"EMBAR_STATUS_FELL_BEHIND",
        EmbarStatus::Panic => c"EMBAR_STATUS_PANIC",
        EmbarStatus::Other => c"EMBAR_STATUS_OTHER",
        EmbarStatus::PoolLost => c"EMBAR_STATUS_POOL_LOST",
        EmbarStatus::BadPool => c"EMBAR_STATUS_BAD_POOL",
    };
    name.as_ptr()
}

/// Connects to the control process at `control` (`"host:port"`), or, when `control` is
/// NULL, to the one found as the `embar` command finds it (`$EMBAR_CONTROL`, else the
/// directory of `embar cluster up`). On success `*out` is a client to free with
/// `embar_client_free`.
///
/// # Safety
/// `control` is NULL or a NUL-terminated string; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn embar_client_connect(
    control: *const c_char,
    out: *mut *mut EmbarClient,
) -> EmbarStatus {
    guard(|| {
        let b = Client::builder();
        let b = if control.is_null() {
            b
        } else {
            // SAFETY: not NULL, a string (the caller's contract).
            b.control(unsafe { text(control, "control") }?)?
        };
        let inner = b.connect()?;
        // SAFETY: `out` is writable (the caller's contract).
        unsafe { give(out, EmbarClient { inner }) }
    })
}

/// Frees a client (NULL: nothing). Its publishers and subscribers stay usable.
///
/// # Safety
/// `client` is NULL or a client from `embar_client_connect`, not freed before, not used
/// after.
#[no_mangle]
pub unsafe extern "C" fn embar_client_free(client: *mut EmbarClient) {
    // SAFETY: the caller's contract, as `take` requires.
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe { take(client) }));
}

/// Creates a topic: ORDER (0, 1, 2, 4, 5), ACK (0, 1, 2), replication factor, batch size
/// in bytes (within one pool segment). Fails closed on a combination the cluster refuses.
///
/// # Safety
/// `client` is a live client; `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn embar_topic_create(
    client: *const EmbarClient,
    name: *const c_char,
    order: u8,
    ack: u8,
    replication_factor: u8,
    batch_bytes: u64,
) -> EmbarStatus {
    guard(|| {
        // SAFETY: a live client, only read (the caller's contract).
        let client = unsafe { client.as_ref() }.ok_or_else(|| invalid("`client` is NULL"))?;
        let spec = TopicSpec {
            // SAFETY: a string (the caller's contract).
            name: unsafe { text(name, "name") }?.to_string(),
            order,
            ack,
            replication_factor,
            batch_bytes,
        };
        client.inner.create_topic(&spec)?;
        Ok(EmbarStatus::Ok)
    })
}

/// Opens a publisher of `topic` (a session on every live broker). On success `*out` is a
/// publisher to free with `embar_publisher_free` (which sends what is still open).
///
/// # Safety
/// `client` is a live client; `topic` is a NUL-terminated string; `out` is valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn embar_publisher_open(
    client: *const EmbarClient,
    topic: *const c_char,
    out: *mut *mut EmbarPublisher,
) -> EmbarStatus {
    guard(|| {
        // SAFETY: a live client, only read (the caller's contract).
        let client = unsafe { client.as_ref() }.ok_or_else(|| invalid("`client` is NULL"))?;
        // SAFETY: a string (the caller's contract).
        let inner = client.inner.publisher(unsafe { text(topic, "topic") }?)?;
        // SAFETY: `out` is writable (the caller's contract).
        unsafe { give(out, EmbarPublisher { inner }) }
    })
}

/// Appends one message of `len` bytes at `data` (copied during the call) to the open
/// batch; `*seq`, if `seq` is not NULL, is its number among this publisher's messages
/// (0, 1, ...): it is acknowledged once `embar_publisher_acked` is above it.
///
/// # Safety
/// `publisher` is a live publisher; `data` is readable for `len` bytes (may be NULL when
/// `len` is 0); `seq` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn embar_publish(
    publisher: *mut EmbarPublisher,
    data: *const u8,
    len: usize,
    seq: *mut u64,
) -> EmbarStatus {
    guard(|| {
        // SAFETY: a live publisher used by this thread only (the caller's contract).
        let p = unsafe { handle(publisher, "publisher") }?;
        let payload: &[u8] = match (data.is_null(), len) {
            (_, 0) => &[],
            (true, _) => return Err(invalid("`data` is NULL")),
            // SAFETY: readable for `len` bytes during the call (the caller's contract).
            (false, _) => unsafe { std::slice::from_raw_parts(data, len) },
        };
        let n = p.inner.publish(payload)?;
        // SAFETY: NULL or writable (the caller's contract).
        unsafe { put(seq, n) };
        Ok(EmbarStatus::Ok)
    })
}

/// Seals the open batch and sends it now.
///
/// # Safety
/// `publisher` is a live publisher.
#[no_mangle]
pub unsafe extern "C" fn embar_publisher_flush(publisher: *mut EmbarPublisher) -> EmbarStatus {
    guard(|| {
        // SAFETY: a live publisher used by this thread only (the caller's contract).
        unsafe { handle(publisher, "publisher") }?.inner.flush()?;
        Ok(EmbarStatus::Ok)
    })
}

/// Sends the open batch if it has lingered (call it when there is nothing to publish).
///
/// # Safety
/// `publisher` is a live publisher.
#[no_mangle]
pub unsafe extern "C" fn embar_publisher_poll(publisher: *mut EmbarPublisher) -> EmbarStatus {
    guard(|| {
        // SAFETY: a live publisher used by this thread only (the caller's contract).
        unsafe { handle(publisher, "publisher") }?.inner.poll()?;
        Ok(EmbarStatus::Ok)
    })
}

/// `*acked`: how many of this publisher's first messages are all acknowledged (never
/// blocks).
///
/// # Safety
/// `publisher` is a live publisher; `acked` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn embar_publisher_acked(
    publisher: *mut EmbarPublisher,
    acked: *mut u64,
) -> EmbarStatus {
    guard(|| {
        // SAFETY: a live publisher used by this thread only (the caller's contract).
        let n = unsafe { handle(publisher, "publisher") }?.inner.acked()?;
        // SAFETY: NULL or writable (the caller's contract).
        unsafe { put(acked, n) };
        Ok(EmbarStatus::Ok)
    })
}

/// Flushes, then waits up to `timeout_ms` until every message published so far is
/// acknowledged (`EMBAR_STATUS_TIMED_OUT` if not); `*acked`: how many are.
///
/// # Safety
/// `publisher` is a live publisher; `acked` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn embar_publisher_wait_acks(
    publisher: *mut EmbarPublisher,
    timeout_ms: u64,
    acked: *mut u64,
) -> EmbarStatus {
    guard(|| {
        // SAFETY: a live publisher used by this thread only (the caller's contract).
        let p = unsafe { handle(publisher, "publisher") }?;
        let n = p
            .inner
            .wait_acks_timeout(Duration::from_millis(timeout_ms))?;
        // SAFETY: NULL or writable (the caller's contract).
        unsafe { put(acked, n) };
        Ok(EmbarStatus::Ok)
    })
}

/// Frees a publisher (NULL: nothing): sends its open batch and ends its sessions, without
/// waiting for acknowledgements (wait first with `embar_publisher_wait_acks`).
///
/// # Safety
/// `publisher` is NULL or a publisher from `embar_publisher_open`, not freed before, not
/// used after.
#[no_mangle]
pub unsafe extern "C" fn embar_publisher_free(publisher: *mut EmbarPublisher) {
    // SAFETY: the caller's contract, as `take` requires.
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe { take(publisher) }));
}

/// Opens a subscriber of `topic` starting at `start` (`total_order` is read for
/// `EMBAR_START_TOTAL_ORDER` only). On the pool host. On success `*out` is a subscriber to
/// free with `embar_subscriber_free`.
///
/// # Safety
/// `client` is a live client; `topic` is a NUL-terminated string; `out` is valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn embar_subscriber_open(
    client: *const EmbarClient,
    topic: *const c_char,
    start: EmbarStart,
    total_order: u64,
    out: *mut *mut EmbarSubscriber,
) -> EmbarStatus {
    guard(|| {
        // SAFETY: a live client, only read (the caller's contract).
        let client = unsafe { client.as_ref() }.ok_or_else(|| invalid("`client` is NULL"))?;
        let start = match start {
            EmbarStart::Oldest => StartAt::Oldest,
            EmbarStart::Latest => StartAt::Latest,
            EmbarStart::TotalOrder => StartAt::TotalOrder(total_order),
        };
        // SAFETY: a string (the caller's contract).
        let inner = client
            .inner
            .subscriber(unsafe { text(topic, "topic") }?, start)?;
        // SAFETY: `out` is writable (the caller's contract).
        unsafe { give(out, EmbarSubscriber { inner, last: None }) }
    })
}

/// Waits up to `timeout_ms` for the next message in total order and fills `*message`
/// (`EMBAR_STATUS_AGAIN`: none came; `*message` is untouched). The payload it points to is
/// valid until the next call with this subscriber, or its free.
///
/// # Safety
/// `subscriber` is a live subscriber; `message` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn embar_subscriber_next(
    subscriber: *mut EmbarSubscriber,
    timeout_ms: u64,
    message: *mut EmbarMessage,
) -> EmbarStatus {
    guard(|| {
        // SAFETY: a live subscriber used by this thread only (the caller's contract).
        let s = unsafe { handle(subscriber, "subscriber") }?;
        if message.is_null() {
            return Err(invalid("`message` is NULL"));
        }
        s.last = s.inner.next_timeout(Duration::from_millis(timeout_ms))?;
        let Some(m) = &s.last else {
            return Ok(EmbarStatus::Again);
        };
        let out = EmbarMessage {
            total_order: m.total_order,
            client_id: m.client_id,
            batch_seq: m.batch_seq,
            index: m.index,
            num_msg: m.num_msg,
            payload: m.payload.as_ptr(),
            payload_len: m.payload.len(),
        };
        // SAFETY: not NULL (checked), writable (the caller's contract).
        unsafe { put(message, out) };
        Ok(EmbarStatus::Ok)
    })
}

/// Frees a subscriber (NULL: nothing) and its cursor in the pool.
///
/// # Safety
/// `subscriber` is NULL or a subscriber from `embar_subscriber_open`, not freed before, not
/// used after.
#[no_mangle]
pub unsafe extern "C" fn embar_subscriber_free(subscriber: *mut EmbarSubscriber) {
    // SAFETY: the caller's contract, as `take` requires.
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe { take(subscriber) }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: the library's own NUL-terminated string, read before the next call.
        unsafe { CStr::from_ptr(embar_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_null_argument_is_refused_with_its_name() {
        let mut client = std::ptr::null_mut();
        // SAFETY: NULL handles and strings are what is tested; `client` is writable.
        let s = unsafe { embar_publisher_open(std::ptr::null(), c"t".as_ptr(), &mut client) };
        assert_eq!(s, EmbarStatus::InvalidArgument);
        assert_eq!(last_error(), "`client` is NULL");
        // SAFETY: as above.
        let s = unsafe {
            embar_publish(
                std::ptr::null_mut(),
                std::ptr::null(),
                0,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(s, EmbarStatus::InvalidArgument);
        assert_eq!(last_error(), "`publisher` is NULL");
        // SAFETY: freeing NULL does nothing.
        unsafe {
            embar_client_free(std::ptr::null_mut());
            embar_publisher_free(std::ptr::null_mut());
            embar_subscriber_free(std::ptr::null_mut());
        }
    }

    #[test]
    fn an_unreachable_control_process_is_unavailable_with_the_reason() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = CString::new(closed.local_addr().unwrap().to_string()).unwrap();
        drop(closed);
        let mut client = std::ptr::null_mut();
        // SAFETY: a valid string and a writable `out`.
        let s = unsafe { embar_client_connect(addr.as_ptr(), &mut client) };
        assert_eq!(s, EmbarStatus::Unavailable);
        assert!(client.is_null());
        assert!(
            last_error().contains("cannot reach the control process"),
            "{}",
            last_error()
        );
        // SAFETY: a static string.
        let name = unsafe { CStr::from_ptr(embar_status_name(s)) };
        assert_eq!(name.to_str().unwrap(), "EMBAR_STATUS_UNAVAILABLE");
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let s = guard(|| panic!("boom"));
        assert_eq!(s, EmbarStatus::Panic);
        assert!(last_error().contains("boom"), "{}", last_error());
        assert_eq!(guard(|| Ok(EmbarStatus::Ok)), EmbarStatus::Ok);
    }

    #[test]
    fn pool_errors_have_the_status_of_their_kind_a_lost_pool_its_own() {
        use embar_client::PoolError;
        let path = || std::path::PathBuf::from("/dev/shm/embar-pool");
        let cases = [
            (
                PoolError::BackingShrunk {
                    path: path(),
                    file_bytes: 4096,
                    pool_bytes: 1 << 26,
                },
                EmbarStatus::PoolLost,
            ),
            (
                PoolError::VersionMismatch {
                    path: path(),
                    found: 1,
                    expected: 2,
                },
                EmbarStatus::BadPool,
            ),
            (
                PoolError::FellBehind {
                    position: 1,
                    oldest: 5,
                },
                EmbarStatus::FellBehind,
            ),
            (PoolError::UnknownTopic("t".into()), EmbarStatus::NotFound),
        ];
        for (e, status) in cases {
            let text = e.to_string();
            let Failure(got, message) = Failure::from(Error::from(e));
            assert_eq!(got, status, "{text}");
            assert_eq!(message, text);
        }
        // SAFETY: a static string.
        let name = unsafe { CStr::from_ptr(embar_status_name(EmbarStatus::PoolLost)) };
        assert_eq!(name.to_str().unwrap(), "EMBAR_STATUS_POOL_LOST");
    }
}
