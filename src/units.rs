//! Byte sizes on the command line (`4096`, `64KiB`, `16MiB`, `1GiB`): the flags parse them with
//! the data plane's reader.

pub use embar_dataplane::units::{format_bytes, parse_bytes};
