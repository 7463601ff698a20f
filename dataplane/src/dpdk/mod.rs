//! The DPDK transport (feature `dpdk`): publishers send batches as Ethernet frames over a
//! DPDK port; the broker's poll-mode loop ([`frontend`]) puts each frame's bytes into the
//! session's granted pool space and publishes the batch as the other transports do.
//!
//! A session opens over the broker's TCP port (one line each way, as for TCP and verbs
//! publishers; the connection stays open as the session's lifeline: when it closes, the
//! session ends):
//!
//! ```text
//! publisher -> EMBAR-DPDK/1 topic=T client=ID link=memif:SOCKET | link=mac:MAC
//! broker    -> OK broker=SLOT batch_bytes=N ack=A session=KEY mac=MAC frame_bytes=F window=W
//! ```
//!
//! `link=memif:SOCKET`: the publisher's process listens as a memif server on SOCKET and the
//! broker's poll loop attaches a memif client port to it (a point-to-point link per
//! publisher). `link=mac:MAC`: both sides sit on a shared Ethernet segment (af_packet on a
//! veth pair, or NICs) and the broker's configured port answers to MAC.
//!
//! Frames: Ethernet (ethertype [`ETHERTYPE`]), then a 48-byte [`Header`] and its payload.
//! Data frames carry a piece of one batch (its bytes in the pool's format); ack frames carry
//! the cumulative frame ack and window ([`link`]) and the session's counters as a TCP
//! [`AckFrame`](crate::tcp::AckFrame). Every frame has a CRC32C over header and payload; a frame that fails it is
//! dropped and counted, as is a frame for an unknown session.

pub mod frontend;
pub mod link;
pub mod publisher;

use embar_sys::dpdk::{DpdkError, MbufPool, TxBurst};

/// First word of a publisher's request line.
pub use crate::tcp::DPDK_HELLO as HELLO;
/// What a publisher writes on its session's TCP connection when it is done with the session.
pub const BYE: &str = "BYE\n";
/// IEEE 802 "local experimental" ethertype.
pub const ETHERTYPE: u16 = 0x88B5;
/// `"EBD1"`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"EBD1");
pub const KIND_DATA: u8 = 1;
pub const KIND_ACK: u8 = 2;
/// Ethernet header bytes.
pub const ETH_BYTES: usize = 14;
/// Frame bytes when no option says otherwise: a standard 1500-byte MTU.
pub const DEFAULT_FRAME_BYTES: u32 = 1514;
/// Frames a publisher may have unacknowledged on a session (the window's upper bound): half
/// of a memif ring ([`embar_sys::dpdk::memif_devargs`]), so that two sessions' windows fit.
pub const MAX_WINDOW: u32 = 1024;

/// The fixed part of a frame after the Ethernet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    /// Payload bytes after the header.
    pub len: u16,
    pub session: u32,
    /// Data: the frame's sequence number; ack: the next one the receiver expects.
    pub seq: u32,
    /// Ack: frames the sender may have in flight past `seq`.
    pub window: u32,
    pub batch_seq: u64,
    pub batch_bytes: u32,
    pub num_msg: u32,
    pub offset: u32,
}

impl Header {
    pub const BYTES: usize = 48;

    /// Writes the header, then the CRC over it and `payload` (which must already follow it
    /// in `frame` at `Header::BYTES`).
    pub fn write(&self, frame: &mut [u8]) {
        let b = &mut frame[..Self::BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.kind;
        b[5] = 0;
        b[6..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..12].copy_from_slice(&self.session.to_le_bytes());
        b[12..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&0u32.to_le_bytes());
        b[20..24].copy_from_slice(&self.window.to_le_bytes());
        b[24..32].copy_from_slice(&self.batch_seq.to_le_bytes());
        b[32..36].copy_from_slice(&self.batch_bytes.to_le_bytes());
        b[36..40].copy_from_slice(&self.num_msg.to_le_bytes());
        b[40..44].copy_from_slice(&self.offset.to_le_bytes());
        b[44..48].copy_from_slice(&0u32.to_le_bytes());
        let crc = checksum(&frame[..Self::BYTES + usize::from(self.len)]);
        frame[16..20].copy_from_slice(&crc.to_le_bytes());
    }

    /// The header of `frame` (after the Ethernet header) and its payload, if the frame is
    /// one of ours, whole, and its checksum holds.
    pub fn read(frame: &[u8]) -> Result<(Header, &[u8]), BadFrame> {
        if frame.len() < Self::BYTES {
            return Err(BadFrame::Short(frame.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(frame[o..o + 4].try_into().expect("4"));
        if u32_at(0) != MAGIC {
            return Err(BadFrame::Magic(u32_at(0)));
        }
        let h = Header {
            kind: frame[4],
            len: u16::from_le_bytes([frame[6], frame[7]]),
            session: u32_at(8),
            seq: u32_at(12),
            window: u32_at(20),
            batch_seq: u64::from_le_bytes(frame[24..32].try_into().expect("8")),
            batch_bytes: u32_at(32),
            num_msg: u32_at(36),
            offset: u32_at(40),
        };
        let end = Self::BYTES + usize::from(h.len);
        // Short Ethernet frames are padded to 60 bytes: more bytes than `len` are fine.
        if frame.len() < end {
            return Err(BadFrame::Truncated {
                len: h.len,
                have: frame.len() - Self::BYTES,
            });
        }
        let crc = u32_at(16);
        if checksum(&frame[..end]) != crc {
            return Err(BadFrame::Checksum);
        }
        Ok((h, &frame[Self::BYTES..end]))
    }

    pub fn data(&self) -> link::DataFrame {
        link::DataFrame {
            seq: self.seq,
            batch_seq: self.batch_seq,
            batch_bytes: self.batch_bytes,
            num_msg: self.num_msg,
            offset: self.offset,
        }
    }
}

/// CRC32C of a frame with its CRC field (bytes 16..20) taken as zero.
fn checksum(frame: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&frame[..16]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &frame[20..])
}

/// Why received bytes are not a frame of this transport.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadFrame {
    #[error("{0} bytes, shorter than a header")]
    Short(usize),
    #[error("not an Embarcadero frame (first word {0:#x})")]
    Magic(u32),
    #[error("a payload of {len} bytes announced, {have} present")]
    Truncated { len: u16, have: usize },
    #[error("the checksum does not hold")]
    Checksum,
}

/// Writes an Ethernet header: `dst`, `src`, [`ETHERTYPE`].
fn write_eth(frame: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
}

/// The source MAC and the rest of an Ethernet frame of [`ETHERTYPE`].
pub fn read_eth(frame: &[u8]) -> Option<([u8; 6], &[u8])> {
    if frame.len() < ETH_BYTES || frame[12..14] != ETHERTYPE.to_be_bytes() {
        return None;
    }
    Some((frame[6..12].try_into().expect("6"), &frame[ETH_BYTES..]))
}

/// Adds a frame to `burst`: Ethernet from `src` to `dst`, the header `h` (its `len` set to
/// `payload`'s), `payload`, then the checksum over both. With `corrupt` (a test aid) a byte is
/// flipped after the checksum, so the frame arrives damaged. `Ok(false)` as for
/// [`TxBurst::push`]: the burst is full or no buffer is free.
pub fn push_frame(
    burst: &mut TxBurst,
    mbufs: MbufPool,
    dst: [u8; 6],
    src: [u8; 6],
    h: &Header,
    payload: &[u8],
    corrupt: bool,
) -> Result<bool, DpdkError> {
    let h = Header {
        len: payload.len() as u16,
        ..*h
    };
    burst.push(mbufs, ETH_BYTES + Header::BYTES + payload.len(), |f| {
        write_eth(f, dst, src);
        f[ETH_BYTES + Header::BYTES..].copy_from_slice(payload);
        h.write(&mut f[ETH_BYTES..]);
        if corrupt {
            let last = f.len() - 1;
            f[last] ^= 0x5a;
        }
    })
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_reads_back_and_any_flipped_bit_is_caught() {
        let h = Header {
            kind: KIND_DATA,
            len: 100,
            session: 7,
            seq: 42,
            window: 0,
            batch_seq: 9,
            batch_bytes: 640,
            num_msg: 3,
            offset: 128,
        };
        let mut f = vec![0u8; Header::BYTES + 100];
        for (i, b) in f[Header::BYTES..].iter_mut().enumerate() {
            *b = i as u8;
        }
        h.write(&mut f);
        let (g, p) = Header::read(&f).unwrap();
        assert_eq!(g, h);
        assert_eq!(p, &f[Header::BYTES..]);
        for bit in 0..f.len() * 8 {
            let mut c = f.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Header::read(&c).is_err(),
                "bit {bit} flipped went unnoticed"
            );
        }
        assert_eq!(
            Header::read(&f[..60]),
            Err(BadFrame::Truncated { len: 100, have: 12 })
        );
    }

    #[test]
    fn macs_parse_and_print() {
        let m = parse_mac("02:00:0a:ff:00:01").unwrap();
        assert_eq!(format_mac(m), "02:00:0a:ff:00:01");
        assert_eq!(parse_mac("02:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:07"), None);
    }
}
