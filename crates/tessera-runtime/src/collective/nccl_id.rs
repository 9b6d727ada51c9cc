//! NCCL unique ids: the 128 bytes that name one NCCL group, and where they come from.
//!
//! One rank of each group makes the id (`ncclGetUniqueId`, which also starts the group's
//! bootstrap listener in that rank's process, so the id holds that process's address);
//! the coordinator relays it to the other ranks over gRPC. The id is what admits a
//! process to the group, so it is kept out of logs like the TCP token.
//!
//! This file builds with and without the `cuda` feature: ids arrive over the network on
//! every worker and are checked the same way; only making one needs NCCL.

use std::fmt;

use crate::error::{Result, RuntimeError};

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// The unique id of one NCCL group.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl NcclId {
    /// Checks that `bytes`, the request field `field`, is an id: exactly
    /// [`NCCL_ID_BYTES`] long. Its content is NCCL's to judge when the group forms.
    pub fn parse(field: &'static str, bytes: &[u8]) -> Result<NcclId> {
        let id: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            RuntimeError::invalid(
                field,
                format!(
                    "{} bytes; an NCCL unique id is exactly {NCCL_ID_BYTES}",
                    bytes.len()
                ),
            )
        })?;
        Ok(NcclId(id))
    }

    /// The id's bytes, as they travel.
    pub fn as_bytes(&self) -> &[u8; NCCL_ID_BYTES] {
        &self.0
    }
}

impl From<[u8; NCCL_ID_BYTES]> for NcclId {
    fn from(bytes: [u8; NCCL_ID_BYTES]) -> Self {
        NcclId(bytes)
    }
}

impl fmt::Debug for NcclId {
    /// Leaves the bytes out: they admit a process to the group.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NcclId(..)")
    }
}

/// What to do when libnccl cannot be opened.
pub const NCCL_MISSING: &str = "NCCL library not found: libnccl.so.2 cannot be opened. \
     Install it with `pip install nvidia-nccl-cu13` and put the wheel's nvidia/nccl/lib \
     directory on LD_LIBRARY_PATH, or set LD_LIBRARY_PATH to the directory that holds an \
     installed libnccl.so.2";

/// Makes the id of a new group on this machine: the caller's process becomes the
/// group's bootstrap root, so it must be a process every rank can reach (Tessera has the
/// group's first member make it). Fails with [`NCCL_MISSING`] when libnccl is absent,
/// and in a build without the `cuda` feature, instead of panicking.
pub fn new_unique_id() -> Result<NcclId> {
    #[cfg(feature = "cuda")]
    {
        super::nccl::new_unique_id()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(RuntimeError::CudaUnavailable(format!(
            "NCCL needs CUDA: {}",
            crate::cuda::NOT_COMPILED
        )))
    }
}

/// Fails, saying why and what to do, unless this process can use NCCL: the build has the
/// `cuda` feature and libnccl (recent enough) can be opened. Loads nothing else.
pub fn require_nccl() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        super::nccl::require_library().map(|_| ())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(RuntimeError::CudaUnavailable(format!(
            "NCCL needs CUDA: {}",
            crate::cuda::NOT_COMPILED
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_exactly_128_bytes() {
        let id = NcclId::parse("nccl.tp_id", &[7; NCCL_ID_BYTES]).unwrap();
        assert_eq!(id.as_bytes(), &[7; NCCL_ID_BYTES]);
        for len in [0, 1, 127, 129, 256] {
            let e = NcclId::parse("nccl.prev_id", &vec![7; len])
                .unwrap_err()
                .to_string();
            assert!(e.contains("nccl.prev_id"), "{len}: {e}");
            assert!(e.contains(&format!("{len} bytes")), "{len}: {e}");
            assert!(e.contains("exactly 128"), "{len}: {e}");
        }
    }

    #[test]
    fn an_id_stays_out_of_logs() {
        let id = NcclId::from([0x41; NCCL_ID_BYTES]);
        let shown = format!("{id:?}");
        assert!(!shown.contains("65") && !shown.contains('A'), "{shown}");
    }

    /// Where libnccl is missing (or the build has no CUDA), making an id or asking for
    /// NCCL is an error that says what to install, never a panic.
    #[test]
    fn without_nccl_making_an_id_is_an_error_that_says_what_to_install() {
        let present = cfg!(feature = "cuda") && library_present();
        match new_unique_id() {
            Ok(id) => assert!(present, "an id {id:?} was made without libnccl"),
            Err(e) => {
                let text = e.to_string();
                if !cfg!(feature = "cuda") {
                    assert!(text.contains("--features cuda"), "{text}");
                } else if !present {
                    assert!(text.contains("NCCL library not found"), "{text}");
                    assert!(text.contains("nvidia-nccl-cu13"), "{text}");
                    assert!(text.contains("LD_LIBRARY_PATH"), "{text}");
                }
            }
        }
        let required = require_nccl();
        assert_eq!(required.is_ok(), present, "{required:?}");
        if !present {
            let text = required.unwrap_err().to_string();
            assert!(text.contains("NCCL"), "{text}");
        }
    }

    fn library_present() -> bool {
        #[cfg(feature = "cuda")]
        {
            super::super::nccl::library_present()
        }
        #[cfg(not(feature = "cuda"))]
        {
            false
        }
    }
}
