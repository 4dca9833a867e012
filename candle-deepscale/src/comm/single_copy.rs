//! Single-copy reads between the processes of one node (Linux's cross-memory attach,
//! `process_vm_readv`), what Open MPI calls its single-copy mechanism (`smsc/cma`).
//!
//! Through a shared segment every byte a collective moves is copied twice: into the sender's
//! slot and out of it. An in-process rank reads its peer's buffer directly, once; with
//! `process_vm_readv` a rank reads another process's buffer into its own memory the same way, so
//! large shared-memory collectives move half the bytes. It needs the permission `ptrace` needs
//! (the same user; Yama's `ptrace_scope` 1 also wants the peer's `PR_SET_PTRACER`, which Open
//! MPI's shared-memory transport sets), so a group probes it before using it and keeps the
//! two-copy path where it fails.

/// Whether the environment allows single-copy reads: `DEEPSCALE_MPI_SINGLE_COPY=0` turns them
/// off (every large collective then goes through the segment's slots).
pub fn enabled() -> bool {
    std::env::var("DEEPSCALE_MPI_SINGLE_COPY").map_or(true, |v| v.trim() != "0")
}

/// Copies `dst.len()` bytes from address `addr` of process `pid` into `dst`.
#[cfg(target_os = "linux")]
pub fn read(pid: i32, addr: usize, dst: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < dst.len() {
        let rest = dst.len() - done;
        let local = libc::iovec {
            iov_base: dst[done..].as_mut_ptr().cast(),
            iov_len: rest,
        };
        let remote = libc::iovec {
            iov_base: (addr + done) as *mut libc::c_void,
            iov_len: rest,
        };
        // SAFETY: `local` is `rest` writable bytes of `dst`; the kernel checks `remote` against
        // the other process's mappings (EFAULT where it is not mapped) and our permission.
        let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        match r {
            r if r > 0 => done += r as usize,
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn read(_pid: i32, _addr: usize, _dst: &mut [u8]) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn reads_a_buffer_of_a_process_by_its_address() {
        let src: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        read(std::process::id() as i32, src.as_ptr() as usize, &mut dst).unwrap();
        assert!(dst == src);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn an_unmapped_address_is_an_error_not_a_crash() {
        let mut dst = vec![0u8; 64];
        let e = read(std::process::id() as i32, 8, &mut dst).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
    }
}
