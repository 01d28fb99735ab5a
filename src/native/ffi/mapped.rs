//! A sealed memfd mapped read-only: a library's bytes checked in place,
//! without copying them into this process.

use std::io;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use rustix::fs::SealFlags;
use rustix::mm::{MapFlags, ProtFlags};

/// A whole sealed file mapped read-only; unmapped on drop.
pub(crate) struct Mapped {
    start: NonNull<u8>,
    len: usize,
}

impl Mapped {
    /// Maps the whole of `fd`, which must be sealed against writing,
    /// shrinking and growing (checked): its bytes then cannot change, and
    /// no page of the mapping can vanish (no `SIGBUS`), while it is mapped.
    pub(crate) fn sealed(fd: impl AsFd) -> io::Result<Mapped> {
        let fd = fd.as_fd();
        let needed = SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW;
        if !rustix::fs::fcntl_get_seals(fd)?.contains(needed) {
            return Err(io::Error::other("the file is not sealed"));
        }
        let len = usize::try_from(rustix::fs::fstat(fd)?.st_size)
            .map_err(|_| io::Error::other("the file does not fit in memory"))?;
        if len == 0 {
            return Ok(Mapped {
                start: NonNull::dangling(),
                len: 0,
            });
        }
        // SAFETY: a new read-only shared mapping of the whole file, placed
        // by the kernel (it overlaps nothing); `Drop` unmaps exactly it.
        let start = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let start =
            NonNull::new(start.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapped { start, len })
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `len` readable bytes at `start` (a dangling pointer when
        // `len` is 0), mapped until `drop`; sealed, so never written.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the range `sealed` mapped; no slice of it outlives
            // `self` (`deref` borrows it).
            let _ = unsafe { rustix::mm::munmap(self.start.as_ptr().cast(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn only_sealed_files_are_mapped() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::ALLOW_SEALING).unwrap();
        let mut file = std::fs::File::from(fd);
        file.write_all(b"code").unwrap();
        let err = Mapped::sealed(&file)
            .err()
            .expect("an unsealed file is refused");
        assert!(err.to_string().contains("not sealed"), "{err}");
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW,
        )
        .unwrap();
        assert_eq!(&*Mapped::sealed(&file).unwrap(), b"code");
    }
}
