//! Every record that lives in the pool, with its size and the role that writes each line.
//!
//! All pool words are atomics: other processes (and, on CXL, other hosts) read and write them
//! concurrently, so a plain load or store would be a data race. A `Relaxed` atomic store
//! compiles to a plain `mov` on x86_64 and aarch64, so this costs nothing on the hot path.
//! Only payload bytes (messages inside segments) are plain memory, handed from writer to
//! reader by the ring's readiness word.
//!
//! The single-writer table (which role writes which 64-byte line) is in `docs/pool-layout.md`
//! and repeated on each record below.

use crate::sync::{AtomicU32, AtomicU64};

/// Cache line size: the unit of ownership in the pool.
pub const CACHE_LINE: usize = 64;
/// `"EMBARCXL"` little-endian; written last when a pool is formatted.
pub const POOL_MAGIC: u64 = u64::from_le_bytes(*b"EMBARCXL");
/// Bumped whenever any record or region below changes shape.
pub const LAYOUT_VERSION: u32 = 8;
/// Brokers a topic can have; fixes the size of a [`TInode`].
pub const MAX_BROKERS: usize = 32;
/// Longest topic name, in bytes of UTF-8.
pub const TOPIC_NAME_MAX_BYTES: usize = 192;
/// Most topics a pool can be formatted for.
pub const MAX_TOPICS_LIMIT: u32 = 4096;
/// Ring slot count bounds (a power of two in between).
pub const RING_SLOTS_MIN: u32 = 2;
pub const RING_SLOTS_MAX: u32 = 1 << 20;
/// Smallest segment; segments are multiples of 4 KiB.
pub const SEGMENT_BYTES_MIN: u64 = 64 << 10;
/// Largest message payload.
pub const MESSAGE_BYTES_MAX: u64 = 64 << 20;
/// Most messages in one batch.
pub const BATCH_MESSAGES_MAX: u32 = 1 << 20;
/// Version stamped in every batch header this build writes.
pub const BATCH_HEADER_VERSION: u32 = 1;
/// Superblock alignment of every region after it.
pub const REGION_ALIGN: u64 = 4096;

/// The first 256 bytes of a pool.
///
/// | line | writer | contents |
/// |---|---|---|
/// | 0 | formatter (once) | magic, version, sizes, identity |
/// | 1 | formatter (once) | geometry: counts, region offsets |
/// | 2 | control process | cluster epoch |
/// | 3 | formatter (once) | more geometry (sequencer state region) |
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Superblock {
    /// [`POOL_MAGIC`] once formatting is complete; stored last.
    pub magic: AtomicU64,
    pub layout_version: AtomicU32,
    pub superblock_bytes: AtomicU32,
    pub pool_bytes: AtomicU64,
    /// Random identity of this pool, chosen at format time.
    pub pool_id: AtomicU64,
    pub created_unix_ms: AtomicU64,
    /// 0: coherent, 1: non-coherent (see [`crate::pool::coherence`]).
    pub coherence_mode: AtomicU32,
    pub _pad0: AtomicU32,
    pub _pad1: [AtomicU64; 2],
    pub geometry: GeometryWords,
    /// Cluster epoch, raised by the control process; fences stale writers.
    pub epoch: AtomicU64,
    pub _pad2: [AtomicU64; 7],
    /// Pool offset of the per-topic sequencer state ([`SequencerState`]).
    pub sequencer_region_offset: AtomicU64,
    /// Pool offset of the publisher sessions ([`Session`]).
    pub session_region_offset: AtomicU64,
    /// Pool offset of the brokers' doorbells ([`BrokerDoorbell`]).
    pub doorbell_region_offset: AtomicU64,
    /// Pool offset of what each broker slot says of itself ([`BrokerInfo`]).
    pub broker_info_region_offset: AtomicU64,
    pub _reserved: [AtomicU64; 4],
}

/// Line 1 of the superblock: enough to recompute and cross-check every region.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct GeometryWords {
    pub max_topics: AtomicU32,
    pub max_brokers: AtomicU32,
    pub ring_slots: AtomicU32,
    pub _pad: AtomicU32,
    pub segment_bytes: AtomicU64,
    pub topic_table_offset: AtomicU64,
    pub ring_region_offset: AtomicU64,
    pub segment_table_offset: AtomicU64,
    pub segment_pool_offset: AtomicU64,
    pub segment_count: AtomicU64,
}

/// One topic in the topic table ("TInode"): a header written by the control process, then one
/// [`BrokerEntry`] per broker.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct TInode {
    pub header: TopicHeader,
    pub brokers: [BrokerEntry; MAX_BROKERS],
    pub placement: PlacementRegion,
}

/// Exclusions a topic's placement table holds (`crate::replication::placement`).
pub const PLACEMENT_MAX: usize = 16;

/// Writer: the control process. Which broker slots the topic's replica sets pass over, and
/// for which total orders: the slots of brokers that died and did not come back
/// (`crate::replication::placement`).
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct PlacementRegion {
    /// A sequence word: odd while the control process rewrites the table; readers take a
    /// copy between two equal even reads.
    pub version: AtomicU64,
    /// Exclusions in use.
    pub count: AtomicU64,
    pub _pad: [AtomicU64; 6],
    /// Each `[slot, from, until]`: slot `slot` holds no replica of the batches whose first
    /// total order lies in `[from, until)` (`until` = `u64::MAX`: still excluded).
    pub exclusions: [[AtomicU64; 3]; PLACEMENT_MAX],
}

/// Topic metadata. Writer: the control process (lines 0-3). Readers take a consistent copy by
/// reading `state` before and after (a sequence lock on the generation).
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct TopicHeader {
    /// `generation << 8 | TopicState`; see [`crate::pool::topics`].
    pub state: AtomicU64,
    /// FNV-1a 64 of the full name.
    pub name_hash: AtomicU64,
    pub name_len: AtomicU64,
    /// `order | ack << 8 | replication_factor << 16`.
    pub config: AtomicU64,
    pub batch_bytes: AtomicU64,
    /// Cluster epoch at creation.
    pub created_epoch: AtomicU64,
    pub _pad: [AtomicU64; 2],
    /// Name bytes, little-endian packed, zero padded.
    pub name: [AtomicU64; TOPIC_NAME_MAX_BYTES / 8],
}

/// The per-broker part of a [`TInode`]: three regions with three different writers, each on
/// its own cache lines (the original's single 256-byte offset entry, split).
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct BrokerEntry {
    pub broker: BrokerRegion,
    pub replication: ReplicationRegion,
    pub sequencer: SequencerRegion,
}

/// Writer: broker `b` (its receive path).
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct BrokerRegion {
    /// Pool offset of the broker's current log tail (next byte to be granted).
    pub log_offset: AtomicU64,
    /// Pool offset of this (topic, broker)'s batch ring.
    pub batch_headers_offset: AtomicU64,
    /// Ring slots published so far (the ring's producer count).
    pub written: AtomicU64,
    /// Pool offset of the last batch published.
    pub written_addr: AtomicU64,
    /// Delivery index below which this broker may have freed log space of this topic.
    pub reclaimed_below: AtomicU64,
    pub _pad: [AtomicU64; 3],
}

/// Writer: broker `b`'s replication thread (`dataplane/src/replication/`).
///
/// Line 0 is the progress ACK 2 waits for: `durable_delivery` is the topic's delivery index
/// below which every ordered batch whose replica set holds `b` is on `b`'s disk and synced
/// (batches of other replica sets are passed over). Published only after the `fdatasync`
/// that covers it; it grows, except that it is lowered when a placement change puts batches
/// below it into `b`'s sets (`crate::replication::placement`). Lines 1-4:
/// `replication_done[src]`, bytes of broker `src`'s ordered batches that `b` holds durably
/// (for operators; nothing waits on it).
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct ReplicationRegion {
    pub durable_delivery: AtomicU64,
    /// Total order below which every batch of `b`'s sets is synced on its disk (what the
    /// control process re-places a dead slot from).
    pub durable_total_order: AtomicU64,
    /// Writes, syncs or opens of this broker's disk log of the topic that failed.
    pub disk_failures: AtomicU64,
    /// The OS error number of the last failure while it lasts (0 once the log syncs again):
    /// what a publisher waiting for ACK 2 is told.
    pub disk_error: AtomicU64,
    /// The version of the topic's placement table the progress above accounts for
    /// (published after the progress was lowered for it): a reader trusts the progress
    /// only under that version.
    pub placement_seen: AtomicU64,
    pub _pad: [AtomicU64; 3],
    pub replication_done: [AtomicU64; MAX_BROKERS],
}

/// Writer: the sequencer.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct SequencerRegion {
    /// Messages of this broker given a place in the order.
    pub ordered: AtomicU64,
    /// Pool offset of the last batch header ordered.
    pub ordered_offset: AtomicU64,
    /// Ring slots fully processed, a contiguous prefix; the ring's consumer watermark.
    pub ring_consumed: AtomicU64,
    pub _pad: [AtomicU64; 5],
}

/// A batch: the wire header a publisher sends and the ring slot a broker publishes.
///
/// | line | writer | contents |
/// |---|---|---|
/// | 0 | publisher, then the broker that publishes the slot | batch fields; `ready` last |
/// | 1 | sequencer | `total_order`, `ordered` |
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct BatchHeader {
    /// Per-client dense counter 0, 1, 2, ...
    pub batch_seq: AtomicU64,
    pub client_id: AtomicU64,
    pub num_msg: AtomicU32,
    pub broker_id: AtomicU32,
    /// Bytes of the batch payload (message headers and payloads, each 64-byte padded).
    pub total_size: AtomicU64,
    /// Pool offset of the payload.
    pub log_idx: AtomicU64,
    /// Per-broker logical offset of the first message.
    pub start_logical_offset: AtomicU64,
    /// `BATCH_HEADER_VERSION | flags << 32`.
    pub version_flags: AtomicU64,
    /// Ring readiness: absolute slot index + 1, stored last. A slot from an earlier lap holds
    /// a smaller value and is never taken for new.
    pub ready: AtomicU64,
    // Line 1: the sequencer.
    /// First global sequence number of the batch.
    pub total_order: AtomicU64,
    /// Absolute slot index + 1 once the sequencer has decided the slot (`outcome`).
    pub ordered: AtomicU64,
    /// What the sequencer decided: [`OUTCOME_ORDERED`], [`OUTCOME_DUPLICATE`], ...
    pub outcome: AtomicU64,
    /// Index of the batch in the topic's delivery ring (when ordered).
    pub delivery_index: AtomicU64,
    pub _pad: [AtomicU64; 4],
}

/// The sequencer gave the batch a place in the order (or passed it, ORDER 0).
pub const OUTCOME_ORDERED: u64 = 1;
/// A resend of a batch already ordered: dropped, its data is in the log once.
pub const OUTCOME_DUPLICATE: u64 = 2;
/// The client is fenced: dropped, not in the log.
pub const OUTCOME_FENCED: u64 = 3;
/// The slot failed a check: dropped.
pub const OUTCOME_REJECTED: u64 = 4;
/// The client is not tracked: the sequencer's client table was full. Dropped.
pub const OUTCOME_TABLE_FULL: u64 = 5;

/// One message inside a batch payload (as the original `BlogMessageHeader`). Message stride is
/// `round_up(64 + size, 64)`. Written by the publisher before the batch is published; stamped
/// by the sequencer under ORDER 4 after the batch is taken, never concurrently.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageHeader {
    /// Payload bytes following the header.
    pub size: u32,
    pub flags: u32,
    pub client_id: u64,
    pub batch_seq: u64,
    /// Per-broker logical offset of this message.
    pub logical_offset: u64,
    /// Own total order (ORDER 4 stamps it; otherwise derived from the batch).
    pub total_order: u64,
    /// Publisher clock at publish, for latency measurement.
    pub publish_ts_ns: u64,
    pub _reserved: [u64; 2],
}

/// What a subscriber gets for an ordered batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveryMeta {
    pub total_order: u64,
    pub client_id: u64,
    pub batch_seq: u64,
    pub num_msg: u32,
    pub header_version: u16,
    pub flags: u16,
}

/// Clients a topic's sequencer can track (ORDER 4 and 5).
pub const SEQUENCER_CLIENTS_MAX: usize = 1024;

/// What a topic's sequencer keeps in the pool so that a restarted sequencer resumes without a
/// duplicate or a gap.
///
/// | line | writer | contents |
/// |---|---|---|
/// | 0 | sequencer | `epoch`, `next_global`, counters |
/// | 1 | brokers (any) | `doorbell`: bumped to wake a parked sequencer |
/// | 2.. | sequencer | client table: `SEQUENCER_CLIENTS_MAX` x [`ClientEntry`] |
#[repr(C, align(64))]
#[derive(Debug)]
pub struct SequencerState {
    /// Raised by every sequencer instance at start; an instance that sees another value stops.
    pub epoch: AtomicU64,
    /// The next total-order number to hand out (saved after each ordered batch).
    pub next_global: AtomicU64,
    pub duplicates: AtomicU64,
    pub fences: AtomicU64,
    /// Delivery entries written and saved (the next delivery index).
    pub next_delivery: AtomicU64,
    /// Delivery entries subscribers may read: below it every entry is committed.
    pub delivered: AtomicU64,
    /// Subscribers' doorbell: a parked subscriber waits on it (a futex); the sequencer bumps
    /// it and wakes them after publishing `delivered`, when `subscribers_parked` says one
    /// waits. In the sequencer's line on purpose: the sequencer reads the count right after
    /// its store to `delivered`, in a line it holds already.
    pub subscriber_bell: AtomicU32,
    /// Subscribers parked on `subscriber_bell` (each adds itself before it parks).
    pub subscribers_parked: AtomicU32,
    pub _pad0: AtomicU64,
    /// The sequencer's doorbell: a sequencer that runs alone (`embar sequencer`) parks on it
    /// when idle, after setting `sequencer_parked`; a broker that published batches into the
    /// topic's rings bumps it and wakes the sequencer when the flag is set.
    pub doorbell: AtomicU32,
    pub sequencer_parked: AtomicU32,
    pub _pad1: [AtomicU32; 14],
    pub clients: [ClientEntry; SEQUENCER_CLIENTS_MAX],
    /// Subscriber cursors (each line written by its subscriber).
    pub subscribers: [SubscriberEntry; SUBSCRIBERS_MAX],
    /// Ordered batches in total order (written by the sequencer, read by subscribers).
    pub delivery: [DeliveryEntry; DELIVERY_SLOTS],
}

/// Subscribers a topic can have at once.
pub const SUBSCRIBERS_MAX: usize = 16;
/// Entries of a topic's delivery ring.
pub const DELIVERY_SLOTS: usize = 8192;

/// `SubscriberEntry::state & 0xff` of a registered subscriber.
pub const SUBSCRIBER_ACTIVE: u64 = 1;

/// A subscriber's cursor. Writer: that subscriber.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct SubscriberEntry {
    /// `generation << 8 | state` (0 free, 1 active).
    pub state: AtomicU64,
    /// Next delivery index it will read: everything below may be reclaimed.
    pub position: AtomicU64,
    /// Its process: a packed `embar_sys::process::ProcessId` (pid and start time).
    pub pid: AtomicU64,
    pub _pad: [AtomicU64; 5],
}

/// One ordered batch, in total order. Writer: the sequencer.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct DeliveryEntry {
    /// Delivery index + 1, stored last.
    pub stamp: AtomicU64,
    pub total_order: AtomicU64,
    pub client_id: AtomicU64,
    pub batch_seq: AtomicU64,
    pub log_idx: AtomicU64,
    pub total_size: AtomicU64,
    pub num_msg: AtomicU32,
    pub broker: AtomicU32,
    pub _pad: AtomicU64,
}

/// One client of a topic's sequencer: open addressing on `client_id`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ClientEntry {
    /// `client_id + 1`; 0 when the entry is free.
    pub client_key: AtomicU64,
    pub next_expected: AtomicU64,
    /// Bit 0: fenced.
    pub flags: AtomicU64,
    pub _pad: AtomicU64,
}

/// Publisher sessions a broker serves at once (shm transport).
pub const SESSIONS_PER_BROKER: usize = 128;
/// Grants a session can hold (its credits).
pub const SESSION_GRANT_SLOTS: usize = 8;
/// Batches a session can have submitted and not yet taken by its broker.
pub const SESSION_SUBMIT_SLOTS: usize = 32;

/// A publisher's session with one broker, in the pool (shm transport): the publisher asks
/// for log space, the broker grants it, the publisher writes batches there and submits them,
/// the broker checks and publishes them and writes acks back.
///
/// | line | writer | contents |
/// |---|---|---|
/// | 0 | publisher | `state`, `client_id`, `topic`, `pid`, `grants_taken`, `submitted` |
/// | 1 | broker | `accepted`, `grants_issued`, `submit_consumed`, acks, rejections, error |
/// | 2-3 | broker | grant ring |
/// | 4.. | publisher (line 0 of each slot) | submission ring |
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Session {
    /// `generation << 8 | state` (0 free, 1 open, 2 closed).
    pub state: AtomicU64,
    pub client_id: AtomicU64,
    /// Topic slot.
    pub topic: AtomicU64,
    /// The publisher's process, a packed `embar_sys::process::ProcessId` (pid and start
    /// time): the session of a process that exited, is a zombie or whose pid was reused is
    /// reclaimed.
    pub pid: AtomicU64,
    /// Grants the publisher has taken (a grant is done once the next one is taken).
    pub grants_taken: AtomicU64,
    /// Submission ring producer count.
    pub submitted: AtomicU64,
    pub _pad0: [AtomicU64; 2],
    /// The generation the broker accepted (`| REFUSED` bit 63 when it refused it).
    pub accepted: AtomicU64,
    pub grants_issued: AtomicU64,
    /// Submission ring consumer watermark.
    pub submit_consumed: AtomicU64,
    pub acked_messages: AtomicU64,
    pub acked_batches: AtomicU64,
    pub rejected_batches: AtomicU64,
    /// Last error: `code | batch_seq << 8`.
    pub error: AtomicU64,
    /// `CLOCK_MONOTONIC` ns of the latest ack (for publish-to-ack latency).
    pub ack_ns: AtomicU64,
    pub grants: [GrantEntry; SESSION_GRANT_SLOTS],
    pub submissions: [BatchHeader; SESSION_SUBMIT_SLOTS],
}

/// Where an idle broker's polling loop parks, one per broker slot: it parks on `doorbell` (a
/// futex, which works across processes) after announcing it in `sleeping`; whoever gives it
/// work (a publisher that submits, claims a session or takes a grant; a broker that published
/// a batch, for a parked broker that sequences) loads `sleeping` and only when it is set
/// bumps `doorbell` and wakes it. The fast path pays one load of a line that stays shared
/// in every cache while the broker runs. Parks are bounded, so a lost wake-up costs one park.
///
/// | line | writer | contents |
/// |---|---|---|
/// | 0 | the broker | `sleeping`: 0 running, [`SLEEPING`] parked, [`SLEEPING_SEQUENCER`] parked and running the sequencers |
/// | 1 | anyone who rings | `doorbell`: bumped before each wake |
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct BrokerDoorbell {
    pub sleeping: AtomicU32,
    pub _pad0: [AtomicU32; 15],
    pub doorbell: AtomicU32,
    pub _pad1: [AtomicU32; 15],
}

/// Bytes of a broker's data directory path a [`BrokerInfo`] holds at most.
pub const DATA_DIR_MAX_BYTES: usize = 4096 - 64;

/// What a broker slot says of itself to every process on the pool host, one per slot: the
/// absolute path of the data directory of its disk logs (`docs/durability.md`), so that a
/// subscriber can read batches the pool no longer holds from the disks, and the process
/// serving the slot, so that a publisher with a session on it can tell when it is gone
/// (`crate::client::publisher`, failover). Written by the broker that holds the slot, at its
/// start (empty: it keeps no disk log); the path is kept after it exits, so a dead broker's
/// logs stay readable; the process word is cleared when a broker stops cleanly. The
/// sequencing word tells publishers where a small batch is acknowledged soonest
/// (`crate::client::publisher`, "Where a batch goes").
///
/// | line | writer | contents |
/// |---|---|---|
/// | 0 | the broker | `data_dir_len`: bytes of the path (0: none), stored last; `pid`: the serving process, a packed `embar_sys::process::ProcessId` (0: none); `sequencing`: 1 while its loop (or a thread of its process) runs the sequencers of every topic |
/// | 1.. | the broker | the path's bytes |
#[repr(C, align(64))]
#[derive(Debug)]
pub struct BrokerInfo {
    pub data_dir_len: AtomicU64,
    pub pid: AtomicU64,
    pub sequencing: AtomicU64,
    pub _pad: [AtomicU64; 5],
    pub data_dir: [AtomicU64; DATA_DIR_MAX_BYTES / 8],
}

/// [`BrokerDoorbell::sleeping`]: parked.
pub const SLEEPING: u32 = 1;
/// [`BrokerDoorbell::sleeping`]: parked, and its loop runs the sequencers (a batch published
/// into any ring is work for it).
pub const SLEEPING_SEQUENCER: u32 = 2;

/// Log space granted to a session. Writer: the broker.
#[repr(C)]
#[derive(Debug, Default)]
pub struct GrantEntry {
    pub offset: AtomicU64,
    pub bytes: AtomicU64,
}

/// One segment of the log space. Writer: the owner (allocation is a compare-and-swap on
/// `owner`, see [`crate::pool::segments`]).
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct SegmentEntry {
    /// 0 when free; otherwise `OWNED | topic << 16 | broker`.
    pub owner: AtomicU64,
    /// Raised by every new owner, so a reader can tell reuse from the same tenancy.
    pub generation: AtomicU64,
    pub _pad: [AtomicU64; 6],
}

/// Bytes a message occupies in a batch payload: header plus payload, 64-byte padded.
pub const fn message_stride(payload_bytes: u64) -> u64 {
    (64 + payload_bytes).div_ceil(64) * 64
}

/// Rounds `v` up to a multiple of `align` (a power of two).
pub const fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

#[cfg(not(loom))]
mod size_checks {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    const _: () = assert!(size_of::<Superblock>() == 256);
    const _: () = assert!(align_of::<Superblock>() == CACHE_LINE);
    const _: () = assert!(offset_of!(Superblock, geometry) == 64);
    const _: () = assert!(offset_of!(Superblock, epoch) == 128);
    const _: () = assert!(offset_of!(Superblock, sequencer_region_offset) == 192);
    const _: () = assert!(size_of::<ClientEntry>() == 32);
    const _: () = assert!(offset_of!(SequencerState, doorbell) == 64);
    const _: () = assert!(offset_of!(SequencerState, clients) == 128);
    const _: () = assert!(
        size_of::<SequencerState>()
            == 128 + 32 * SEQUENCER_CLIENTS_MAX + 64 * SUBSCRIBERS_MAX + 64 * DELIVERY_SLOTS
    );
    const _: () = assert!(offset_of!(SequencerState, subscribers) % 64 == 0);
    const _: () = assert!(size_of::<DeliveryEntry>() == 64);
    const _: () = assert!(size_of::<SubscriberEntry>() == 64);
    const _: () = assert!(offset_of!(BatchHeader, outcome) == 80);
    const _: () = assert!(size_of::<Session>() == 256 + 128 * SESSION_SUBMIT_SLOTS);
    const _: () = assert!(offset_of!(Session, accepted) == 64);
    const _: () = assert!(offset_of!(Session, grants) == 128);
    const _: () = assert!(offset_of!(Session, submissions) == 256);
    const _: () = assert!(size_of::<GeometryWords>() == 64);
    const _: () = assert!(offset_of!(Superblock, doorbell_region_offset) == 208);
    const _: () = assert!(size_of::<BrokerDoorbell>() == 128);
    const _: () = assert!(offset_of!(Superblock, broker_info_region_offset) == 216);
    const _: () = assert!(size_of::<BrokerInfo>() == 4096);
    const _: () = assert!(offset_of!(BrokerInfo, data_dir) == 64);
    const _: () = assert!(offset_of!(BrokerDoorbell, doorbell) == 64);

    const _: () = assert!(size_of::<TopicHeader>() == 256);
    const _: () = assert!(offset_of!(TopicHeader, name) == 64);
    const _: () = assert!(TOPIC_NAME_MAX_BYTES % 8 == 0);

    const _: () = assert!(size_of::<BrokerRegion>() == 64);
    const _: () = assert!(size_of::<ReplicationRegion>() == 5 * 64);
    const _: () = assert!(offset_of!(ReplicationRegion, replication_done) == 64);
    const _: () = assert!(size_of::<SequencerRegion>() == 64);
    const _: () = assert!(size_of::<BrokerEntry>() == 7 * 64);
    const _: () = assert!(offset_of!(BrokerEntry, replication) == 64);
    const _: () = assert!(offset_of!(BrokerEntry, sequencer) == 6 * 64);
    const _: () =
        assert!(size_of::<TInode>() == 256 + MAX_BROKERS * 7 * 64 + 64 + PLACEMENT_MAX * 24);
    const _: () = assert!(offset_of!(TInode, brokers) == 256);

    const _: () = assert!(size_of::<BatchHeader>() == 128);
    const _: () = assert!(offset_of!(BatchHeader, ready) == 56);
    const _: () = assert!(offset_of!(BatchHeader, total_order) == 64);
    const _: () = assert!(offset_of!(BatchHeader, ordered) == 72);

    const _: () = assert!(size_of::<MessageHeader>() == 64);
    const _: () = assert!(offset_of!(MessageHeader, total_order) == 32);
    const _: () = assert!(size_of::<DeliveryMeta>() == 32);
    const _: () = assert!(size_of::<SegmentEntry>() == 64);

    const _: () = assert!(message_stride(0) == 64);
    const _: () = assert!(message_stride(1) == 128);
    const _: () = assert!(message_stride(1024) == 1088);
}
