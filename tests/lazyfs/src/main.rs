//! `treaty-lazyfs BACKING MOUNTPOINT --control SOCKET`: mounts a filesystem that keeps unsynced
//! writes in memory and drops them when told to (see the `treaty_lazyfs` library doc for the
//! model and the control protocol). Runs until unmounted (`fusermount3 -u MOUNTPOINT`).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (backing, mountpoint, control) = match args.as_slice() {
        [b, m, flag, c] if flag == "--control" => {
            (PathBuf::from(b), PathBuf::from(m), PathBuf::from(c))
        }
        _ => {
            eprintln!("usage: treaty-lazyfs BACKING MOUNTPOINT --control SOCKET");
            return ExitCode::from(2);
        }
    };
    // Die with the thread that started us: a test killed mid-way must not leave a filesystem
    // serving (auto_unmount then removes the mount).
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    match treaty_lazyfs::serve(&backing, &mountpoint, &control) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("treaty-lazyfs: {e}");
            ExitCode::FAILURE
        }
    }
}
