//! The filesystem: a FUSE passthrough over a backing directory that keeps every file's writes
//! since its last fsync aside, in memory, until the next fsync (or a power cut drops them).
//!
//! # The model
//!
//! - **The backing directory holds exactly what survived.** A file's bytes in the backing
//!   directory are its content as of its last `fsync`/`fdatasync` through the mount; the
//!   writes since then live in an in-memory copy of the whole file (`Unsynced`). Reads are
//!   served from that copy when there is one, from the backing file otherwise.
//! - **fsync/fdatasync** writes the copy back (the changed range and the length), fsyncs the
//!   backing file and drops the copy. Both calls are treated alike: metadata other than the
//!   length is not modelled.
//! - **close is not a sync**: FUSE's `flush` and `release` keep the copy. So is
//!   `sync_file_range`, which the kernel does not even forward to a FUSE filesystem: exactly
//!   the gap sled's `flush()` leaves.
//! - **A power cut** ([`LazyState::cut_power`]) drops every copy: each file returns to its
//!   content and length at its last fsync, and a file never fsynced since its creation is
//!   empty.
//! - **Directory entries are not lazy.** `create`, `mkdir`, `unlink`, `rmdir` and `rename` are
//!   applied to the backing directory at once and survive a power cut whether or not the
//!   directory was fsynced. This is kinder than a real disk: this filesystem cannot catch a
//!   missing directory fsync, only missing file syncs.
//!
//! The kernel must not cache what a power cut may take back, so every open file is in
//! `direct_io` mode (no page cache) and attributes and entries are never cached (TTL zero).
//! Simple and correct rather than fast: one lock, one FUSE thread, whole-file copies.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Attributes and entries are never cached by the kernel: a power cut changes lengths.
const TTL: Duration = Duration::ZERO;

/// What a power cut discarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files that had unsynced writes.
    pub files: usize,
    /// Their unsynced content, in bytes (whole copies, not just the changed ranges).
    pub bytes: u64,
}

/// A file's content since its last fsync: the whole file, and the range that differs from the
/// backing file (plus the length).
struct Unsynced {
    content: Vec<u8>,
    /// Start of the range that may differ from the backing file.
    lo: u64,
    /// End of that range (may exceed the content's length after a truncation; clamped when
    /// written back).
    hi: u64,
    /// The backing file, opened read-write: still valid after the name is renamed or unlinked.
    file: Arc<File>,
}

impl Unsynced {
    fn mark(&mut self, lo: u64, hi: u64) {
        self.lo = self.lo.min(lo);
        self.hi = self.hi.max(hi);
    }

    /// Sets the length to `len`; bytes between the old and the new length become zeros (on
    /// growth) or disappear (on shrink), so that whole range must be written back.
    fn set_len(&mut self, len: u64) {
        let old = self.content.len() as u64;
        self.content.resize(len as usize, 0);
        self.mark(old.min(len), old.max(len));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let old = self.content.len() as u64;
        let end = offset + data.len() as u64;
        if end > old {
            self.content.resize(end as usize, 0);
        }
        self.content[offset as usize..end as usize].copy_from_slice(data);
        // A write past the end leaves a hole of zeros that must reach the backing file too.
        self.mark(old.min(offset), end);
    }

    /// Writes the copy back to the backing file and makes it durable there.
    fn persist(&self) -> io::Result<()> {
        let len = self.content.len() as u64;
        self.file.set_len(len)?;
        let hi = self.hi.min(len);
        if self.lo < hi {
            self.file
                .write_all_at(&self.content[self.lo as usize..hi as usize], self.lo)?;
        }
        self.file.sync_all()
    }
}

/// Everything the filesystem knows, behind one lock shared with the control thread.
pub struct LazyState {
    backing: PathBuf,
    /// Inode number → path relative to `backing` ("" is the root, inode 1).
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    /// Open file handles → the backing file.
    handles: HashMap<u64, Arc<File>>,
    next_fh: u64,
    /// Inode → its unsynced content.
    unsynced: HashMap<u64, Unsynced>,
}

impl LazyState {
    /// A state over `backing`, which must be a directory.
    pub fn new(backing: &Path) -> LazyState {
        let mut s = LazyState {
            backing: backing.to_path_buf(),
            paths: HashMap::new(),
            inos: HashMap::new(),
            next_ino: INodeNo::ROOT.0 + 1,
            handles: HashMap::new(),
            next_fh: 1,
            unsynced: HashMap::new(),
        };
        s.paths.insert(INodeNo::ROOT.0, PathBuf::new());
        s.inos.insert(PathBuf::new(), INodeNo::ROOT.0);
        s
    }

    /// Discards every unsynced write: each file returns to its content and length as of its
    /// last fsync. Open handles stay valid and see the old content.
    pub fn cut_power(&mut self) -> CutReport {
        let report = CutReport {
            files: self.unsynced.len(),
            bytes: self.unsynced.values().map(|u| u.content.len() as u64).sum(),
        };
        self.unsynced.clear();
        report
    }

    fn rel(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.rel(parent)?.join(name))
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    fn ino_for(&mut self, rel: &Path) -> u64 {
        if let Some(&ino) = self.inos.get(rel) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inos.insert(rel.to_path_buf(), ino);
        self.paths.insert(ino, rel.to_path_buf());
        ino
    }

    fn forget_path(&mut self, rel: &Path) {
        if let Some(ino) = self.inos.remove(rel) {
            self.paths.remove(&ino);
        }
    }

    /// The attributes of `ino` as the mount shows them: the backing file's, with the length of
    /// the unsynced copy if there is one.
    fn attr(&self, ino: u64, meta: &std::fs::Metadata) -> FileAttr {
        let size = match self.unsynced.get(&ino) {
            Some(u) => u.content.len() as u64,
            None => meta.len(),
        };
        let time = |secs: i64, nsecs: i64| {
            UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsecs.clamp(0, 999_999_999) as u32)
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: SystemTime::UNIX_EPOCH,
            kind: kind_of(meta.file_type()),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr_of(&mut self, ino: u64) -> Result<FileAttr, Errno> {
        let rel = self.rel(INodeNo(ino))?;
        let meta = match std::fs::symlink_metadata(self.full(&rel)) {
            Ok(m) => m,
            // Unlinked while open: the open file still has attributes.
            Err(e) => match self.unsynced.get(&ino) {
                Some(u) => u.file.metadata()?,
                None => return Err(e.into()),
            },
        };
        Ok(self.attr(ino, &meta))
    }

    fn entry(&mut self, rel: &Path) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.full(rel))?;
        let ino = self.ino_for(rel);
        Ok(self.attr(ino, &meta))
    }

    /// The unsynced copy of `ino`, made from the backing file on first use.
    fn unsynced(&mut self, ino: u64, file: Arc<File>) -> io::Result<&mut Unsynced> {
        match self.unsynced.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let len = file.metadata()?.len();
                let mut content = vec![0u8; len as usize];
                file.read_exact_at(&mut content, 0)?;
                Ok(e.insert(Unsynced {
                    content,
                    // Nothing differs from the backing file yet.
                    lo: len,
                    hi: 0,
                    file,
                }))
            }
        }
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.handles.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// A read-write handle on the backing file of `ino`, for a truncation without an open
    /// file (`truncate(2)` on a path).
    fn open_rw(&self, ino: INodeNo) -> Result<Arc<File>, Errno> {
        let path = self.full(&self.rel(ino)?);
        Ok(Arc::new(
            OpenOptions::new().read(true).write(true).open(path)?,
        ))
    }

    fn add_handle(&mut self, file: File) -> FileHandle {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Arc::new(file));
        FileHandle(fh)
    }

    fn fsync(&mut self, ino: u64) -> io::Result<()> {
        if let Some(u) = self.unsynced.get(&ino) {
            // On failure the copy stays: the data is still unsynced, as on a real disk.
            u.persist()?;
            self.unsynced.remove(&ino);
        }
        Ok(())
    }

    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(self.full(from), self.full(to))?;
        // The replaced destination (if any) is gone; everything under `from` moves.
        self.forget_path(to);
        let moved: Vec<(PathBuf, u64)> = self
            .inos
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, &i)| (p.clone(), i))
            .collect();
        for (old, ino) in moved {
            // `to.join("")` would be `to/`: a renamed *file* would then resolve to
            // `<backing>/to/` and fail with ENOTDIR, so the moved path itself maps to `to`.
            let rest = old.strip_prefix(from).expect("filtered on the prefix");
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.inos.remove(&old);
            self.inos.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
        Ok(())
    }
}

fn kind_of(t: std::fs::FileType) -> FileType {
    FileType::from_std(t).unwrap_or(FileType::RegularFile)
}

/// The FUSE side: every call takes the state's lock.
pub struct LazyFilesystem {
    state: Arc<Mutex<LazyState>>,
}

impl LazyFilesystem {
    /// A filesystem over `state`; keep a clone of the `Arc` to cut power from elsewhere.
    pub fn new(state: Arc<Mutex<LazyState>>) -> LazyFilesystem {
        LazyFilesystem { state }
    }

    fn lock(&self) -> MutexGuard<'_, LazyState> {
        lock(&self.state)
    }
}

/// Locks the state, ignoring poisoning: a panicked FUSE call replies nothing and leaves the
/// maps as they were between two statements, each of which keeps them consistent.
pub fn lock(state: &Mutex<LazyState>) -> MutexGuard<'_, LazyState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every file is opened in direct-I/O mode: the kernel's page cache would otherwise keep
/// serving bytes a power cut took back.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

impl Filesystem for LazyFilesystem {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.lock();
        match s.child(parent, name).and_then(|rel| s.entry(&rel)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().attr_of(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        let res = (|| -> Result<FileAttr, Errno> {
            if let Some(mode) = mode {
                // Permissions are metadata this model does not make lazy.
                let path = s.full(&s.rel(ino)?);
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            }
            if let Some(size) = size {
                // A truncation is a data change: it is lost on a power cut like a write.
                let file = match fh {
                    Some(fh) => s.handle(fh)?,
                    None => s.open_rw(ino)?,
                };
                s.unsynced(ino.0, file)?.set_len(size);
            }
            // Owners and times are not modelled: the mount reports the backing file's.
            s.attr_of(ino.0)
        })();
        match res {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let res = (|| -> Result<FileAttr, Errno> {
            let rel = s.child(parent, name)?;
            std::fs::DirBuilder::new()
                .mode(mode & !umask)
                .create(s.full(&rel))?;
            s.entry(&rel)
        })();
        match res {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let res = (|| -> Result<(), Errno> {
            let rel = s.child(parent, name)?;
            std::fs::remove_file(s.full(&rel))?;
            s.forget_path(&rel);
            Ok(())
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let res = (|| -> Result<(), Errno> {
            let rel = s.child(parent, name)?;
            std::fs::remove_dir(s.full(&rel))?;
            s.forget_path(&rel);
            Ok(())
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let res = (|| -> Result<(), Errno> {
            if flags != RenameFlags::empty() {
                // RENAME_NOREPLACE / RENAME_EXCHANGE: not needed by sled, not modelled.
                return Err(Errno::EINVAL);
            }
            let from = s.child(parent, name)?;
            let to = s.child(newparent, newname)?;
            s.rename(&from, &to)?;
            Ok(())
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.lock();
        let res = (|| -> Result<FileHandle, Errno> {
            let path = s.full(&s.rel(ino)?);
            // Read-write whatever the caller asked: the handle also serves the write-back on
            // fsync. The caller's own mode is enforced by the kernel on its descriptor.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .or_else(|_| File::open(&path))?;
            if flags.0 & libc::O_TRUNC != 0 {
                let file = Arc::new(file.try_clone()?);
                s.unsynced(ino.0, file)?.set_len(0);
            }
            Ok(s.add_handle(file))
        })();
        match res {
            Ok(fh) => reply.opened(fh, OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.lock();
        let res = (|| -> Result<(FileAttr, FileHandle), Errno> {
            let rel = s.child(parent, name)?;
            // The new name reaches the backing directory now (entries are not lazy); its
            // content starts empty there, so a file never fsynced comes back empty.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .create_new(flags & libc::O_EXCL != 0)
                .mode(mode & !umask)
                .open(s.full(&rel))?;
            let attr = s.entry(&rel)?;
            if flags & libc::O_TRUNC != 0 {
                let f = Arc::new(file.try_clone()?);
                s.unsynced(attr.ino.0, f)?.set_len(0);
            }
            let fh = s.add_handle(file);
            Ok((s.attr_of(attr.ino.0)?, fh))
        })();
        match res {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), fh, OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.lock();
        if let Some(u) = s.unsynced.get(&ino.0) {
            let len = u.content.len() as u64;
            let start = offset.min(len) as usize;
            let end = (offset + size as u64).min(len) as usize;
            reply.data(&u.content[start..end]);
            return;
        }
        let res = (|| -> Result<Vec<u8>, Errno> {
            let file = s.handle(fh)?;
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match file.read_at(&mut buf[got..], offset + got as u64)? {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            Ok(buf)
        })();
        match res {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        let res = (|| -> Result<(), Errno> {
            let file = s.handle(fh)?;
            let u = s.unsynced(ino.0, file)?;
            let offset = if flags.0 & libc::O_APPEND != 0 {
                u.content.len() as u64
            } else {
                offset
            };
            u.write(offset, data);
            Ok(())
        })();
        match res {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a sync: the unsynced copy stays.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The unsynced copy holds its own handle on the file: it outlives this one, like a
        // page cache outlives the descriptors that dirtied it.
        self.lock().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.lock().fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.lock();
        let res = (|| -> Result<Vec<(u64, FileType, std::ffi::OsString)>, Errno> {
            let rel = s.rel(ino)?;
            let parent_ino = match rel.parent() {
                Some(p) => s.ino_for(p),
                None => INodeNo::ROOT.0,
            };
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".into()),
                (parent_ino, FileType::Directory, "..".into()),
            ];
            let mut names: Vec<(std::ffi::OsString, std::fs::FileType)> = Vec::new();
            for e in std::fs::read_dir(s.full(&rel))? {
                let e = e?;
                names.push((e.file_name(), e.file_type()?));
            }
            // A stable order, so that offsets mean the same thing across calls.
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, t) in names {
                let child = s.ino_for(&rel.join(&name));
                entries.push((child, kind_of(t), name));
            }
            Ok(entries)
        })();
        match res {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    // The offset given is that of the next entry.
                    if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Entries are applied at once (see the module doc); pass the sync through anyway so
        // the backing directory is as durable as the caller asked.
        let s = self.lock();
        let res = (|| -> Result<(), Errno> {
            File::open(s.full(&s.rel(ino)?))?.sync_all()?;
            Ok(())
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.lock();
        let path = match std::ffi::CString::new(s.backing.as_os_str().as_encoded_bytes()) {
            Ok(p) => p,
            Err(_) => return reply.error(Errno::EINVAL),
        };
        // SAFETY: statvfs writes into the zeroed struct we pass and reads the C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return reply.error(io::Error::last_os_error().into());
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The mount is for tests running as the backing directory's owner.
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backing file holding `synced`, and its unsynced copy.
    fn copy_of(synced: &[u8]) -> (tempfile::TempDir, PathBuf, Unsynced) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, synced).expect("write backing file");
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open"),
        );
        let mut state = LazyState::new(dir.path());
        state.unsynced(7, file).expect("copy");
        let u = state.unsynced.remove(&7).expect("copy made");
        (dir, path, u)
    }

    /// A change made to an unsynced copy.
    type Change = dyn Fn(&mut Unsynced);

    #[test]
    fn persist_writes_back_exactly_the_copy() {
        let cases: Vec<(&str, Box<Change>, &[u8])> = vec![
            ("overwrite", Box::new(|u| u.write(2, b"XY")), b"01XY456789"),
            ("append", Box::new(|u| u.write(10, b"ab")), b"0123456789ab"),
            (
                "write past the end leaves zeros",
                Box::new(|u| u.write(12, b"z")),
                b"0123456789\0\0z",
            ),
            ("shrink", Box::new(|u| u.set_len(4)), b"0123"),
            (
                "shrink then grow: the old bytes do not come back",
                Box::new(|u| {
                    u.set_len(2);
                    u.write(6, b"w");
                }),
                b"01\0\0\0\0w",
            ),
            (
                "shrink then grow by truncate",
                Box::new(|u| {
                    u.set_len(1);
                    u.set_len(5);
                }),
                b"0\0\0\0\0",
            ),
            ("nothing", Box::new(|_| {}), b"0123456789"),
        ];
        for (name, change, want) in cases {
            let (_dir, path, mut u) = copy_of(b"0123456789");
            change(&mut u);
            assert_eq!(u.content, want, "{name}: the copy");
            assert_eq!(
                std::fs::read(&path).expect("read"),
                b"0123456789",
                "{name}: the backing file must not change before the fsync"
            );
            u.persist().expect("persist");
            assert_eq!(
                std::fs::read(&path).expect("read"),
                want,
                "{name}: after fsync"
            );
        }
    }

    #[test]
    fn a_cut_drops_every_copy_and_reports_it() {
        let (dir, _path, u) = copy_of(b"abc");
        let mut state = LazyState::new(dir.path());
        state.unsynced.insert(7, u);
        assert_eq!(state.cut_power(), CutReport { files: 1, bytes: 3 });
        assert!(state.unsynced.is_empty());
        assert_eq!(state.cut_power(), CutReport::default());
    }

    #[test]
    fn rename_moves_everything_below() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        let mut state = LazyState::new(dir.path());
        let a = state.ino_for(Path::new("a"));
        let b = state.ino_for(Path::new("a/b"));
        state
            .rename(Path::new("a"), Path::new("z"))
            .expect("rename");
        assert_eq!(state.paths[&a], Path::new("z"));
        assert_eq!(state.paths[&b], Path::new("z/b"));
        assert!(!state.inos.contains_key(Path::new("a/b")));
        assert!(dir.path().join("z/b").is_dir());
    }

    /// sled renames `snap.N.generating` to `snap.N`: the file must resolve by its new name
    /// (a trailing slash, `snap.N/`, made every later open fail with ENOTDIR).
    #[test]
    fn a_renamed_file_resolves_to_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("snap.generating"), b"x").expect("write");
        let mut state = LazyState::new(dir.path());
        let f = state.ino_for(Path::new("snap.generating"));
        state
            .rename(Path::new("snap.generating"), Path::new("snap"))
            .expect("rename");
        let full = state.full(&state.paths[&f]);
        assert_eq!(std::fs::read(&full).expect("read the renamed file"), b"x");
        assert!(state.attr_of(f).is_ok());
    }
}
