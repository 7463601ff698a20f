//! The control process's durable state: a JSON file replaced atomically (write a temporary
//! file, fsync it, rename it over the old one, fsync the directory), so a crash leaves either
//! the old or the new state, never a torn one.
//!
//! Saving fsyncs, which a slow disk can make take seconds; the server never saves while
//! holding the lock its heartbeat handler needs (see `server`).

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::membership::DurableMember;
use crate::topics::TopicSpec;

/// The format this build writes. Format 1 (no members, no address) is still read.
pub const STATE_FORMAT: u32 = 2;

/// Everything that must survive a restart of the control process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Durable {
    pub format: u32,
    /// Cluster epoch: raised at every start of the control process.
    pub epoch: u64,
    /// First broker id never handed out.
    pub next_broker_id: u32,
    pub topics: Vec<TopicSpec>,
    /// The brokers that were live: a restarted control process takes them back (they keep
    /// their ids and slots if they heartbeat in time).
    #[serde(default)]
    pub members: Vec<DurableMember>,
    /// Where the API listened: a restart asked for a free port (`:0`) listens here again, so
    /// that running brokers and clients find it.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// Why the durable state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged ({source}); refusing to start over it")]
    Damaged {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} has state format {found}, this build reads 1..={STATE_FORMAT}")]
    Format { path: PathBuf, found: u32 },
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("control-state.json")
}

/// Loads the state, `None` when there is none yet; a damaged file is an error, never a reset.
pub fn load(dir: &Path) -> Result<Option<Durable>, StoreError> {
    let path = state_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                what: "read",
                path,
                source,
            })
        }
    };
    let mut d: Durable = match serde_json::from_str(&text) {
        Ok(d) => d,
        Err(source) => return Err(StoreError::Damaged { path, source }),
    };
    if !(1..=STATE_FORMAT).contains(&d.format) {
        return Err(StoreError::Format {
            path,
            found: d.format,
        });
    }
    d.format = STATE_FORMAT;
    Ok(Some(d))
}

pub fn save(dir: &Path, d: &Durable) -> Result<(), StoreError> {
    // Tests make the disk slow here (the `fail` crate's fail points; no-ops in a normal build).
    fail::fail_point!("control-store-save", |_| Err(StoreError::Io {
        what: "write",
        path: state_path(dir),
        source: std::io::Error::other("injected by a test"),
    }));
    let path = state_path(dir);
    let tmp = dir.join("control-state.json.tmp");
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { what, path, source }
    };
    let text = serde_json::to_string_pretty(d).expect("the state serialises");
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io("rename over", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_damaged_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("embar-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir).unwrap(), None);
        let d = Durable {
            format: STATE_FORMAT,
            epoch: 3,
            next_broker_id: 5,
            topics: vec![TopicSpec {
                name: "t".into(),
                order: 5,
                ack: 1,
                replication_factor: 0,
                batch_bytes: 1 << 20,
            }],
            members: vec![DurableMember {
                id: 4,
                slot: 1,
                addresses: [("pid".to_string(), "77".to_string())].into(),
            }],
            listen: Some("127.0.0.1:7401".parse().unwrap()),
        };
        save(&dir, &d).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(d));
        std::fs::write(state_path(&dir), "{\"format\": 1, \"epo").unwrap();
        assert!(load(&dir).unwrap_err().to_string().contains("damaged"));
        std::fs::write(
            state_path(&dir),
            r#"{"format": 1, "epoch": 2, "next_broker_id": 3, "topics": []}"#,
        )
        .unwrap();
        let old = load(&dir).unwrap().unwrap();
        assert_eq!(
            (old.epoch, old.members.len()),
            (2, 0),
            "format 1 is still read"
        );
        std::fs::write(
            state_path(&dir),
            r#"{"format": 9, "epoch": 2, "next_broker_id": 3, "topics": []}"#,
        )
        .unwrap();
        assert!(matches!(
            load(&dir),
            Err(StoreError::Format { found: 9, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
