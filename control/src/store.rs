//! The control process's durable state: a JSON file replaced atomically (write a temporary
//! file, fsync it, rename it over the old one, fsync the directory), so a crash leaves either
//! the old or the new state, never a torn one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::topics::TopicSpec;

pub const STATE_FORMAT: u32 = 1;

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
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("control-state.json")
}

/// Loads the state, `None` when there is none yet; a damaged file is an error, never a reset.
pub fn load(dir: &Path) -> Result<Option<Durable>, String> {
    let path = state_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let d: Durable = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is damaged ({e}); refusing to start over it",
            path.display()
        )
    })?;
    if d.format != STATE_FORMAT {
        return Err(format!(
            "{} has state format {}, this build reads {STATE_FORMAT}",
            path.display(),
            d.format
        ));
    }
    Ok(Some(d))
}

pub fn save(dir: &Path, d: &Durable) -> Result<(), String> {
    let path = state_path(dir);
    let tmp = dir.join("control-state.json.tmp");
    let io = |what: &str, e: std::io::Error| format!("cannot {what} {}: {e}", tmp.display());
    let text = serde_json::to_string_pretty(d).map_err(|e| e.to_string())?;
    let mut f = File::create(&tmp).map_err(|e| io("create", e))?;
    f.write_all(text.as_bytes()).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("fsync", e))?;
    drop(f);
    std::fs::rename(&tmp, &path)
        .map_err(|e| format!("cannot rename over {}: {e}", path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot fsync {}: {e}", dir.display()))?;
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
        };
        save(&dir, &d).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(d));
        std::fs::write(state_path(&dir), "{\"format\": 1, \"epo").unwrap();
        assert!(load(&dir).unwrap_err().contains("damaged"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
