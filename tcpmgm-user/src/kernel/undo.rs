//! All or nothing in the kernel step: every change a start, an adoption or a reload makes to
//! the kernel (a pin, a link, a program swapped into a link) is recorded with how to undo it,
//! and a step that fails undoes the earlier ones in reverse order, so that what was there
//! before (nothing, or the policy in force) is left exactly as it was.
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use super::{KernelError, fault, sys};

enum Step {
    /// A pin this step made where there was none.
    Unpin(PathBuf),
    /// A pin this step replaced: the object it held before.
    Repin { path: PathBuf, old: OwnedFd },
    /// A link this step attached.
    Detach { link: OwnedFd, hook: &'static str },
    /// A link whose program this step swapped: the program it held before.
    PutBack {
        link: OwnedFd,
        program: OwnedFd,
        hook: &'static str,
    },
    /// A directory this step made.
    Rmdir(PathBuf),
}

/// The changes made so far, undone on drop unless committed.
#[derive(Default)]
pub(super) struct Undo {
    steps: Vec<Step>,
}

impl Undo {
    pub(super) fn made_dir(&mut self, dir: &Path) {
        self.steps.push(Step::Rmdir(dir.to_path_buf()));
    }

    pub(super) fn made_pin(&mut self, path: &Path) {
        self.steps.push(Step::Unpin(path.to_path_buf()));
    }

    pub(super) fn attached(&mut self, link: &OwnedFd, hook: &'static str) -> std::io::Result<()> {
        self.steps.push(Step::Detach {
            link: link.try_clone()?,
            hook,
        });
        Ok(())
    }

    /// Swaps `program` into `link`, remembering the program it held (`old`).
    pub(super) fn swap(
        &mut self,
        link: &OwnedFd,
        program: std::os::fd::BorrowedFd<'_>,
        old: OwnedFd,
        hook: &'static str,
    ) -> Result<(), KernelError> {
        fault::point(&format!("link-update:{hook}"))
            .and_then(|()| sys::link_update(link.as_fd(), program).map_err(std::io::Error::other))
            .map_err(|source| KernelError::LinkUpdate {
                program: hook,
                source,
            })?;
        self.steps.push(Step::PutBack {
            link: link.try_clone().map_err(|source| KernelError::LinkUpdate {
                program: hook,
                source,
            })?,
            program: old,
            hook,
        });
        Ok(())
    }

    /// Pins `fd` at `path`, replacing what is pinned there (put back on undo).
    pub(super) fn pin(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        path: &Path,
    ) -> Result<(), KernelError> {
        let fail = |e: super::Cause| KernelError::Pin {
            path: path.to_path_buf(),
            source: e,
        };
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        fault::point(&format!("pin:{name}")).map_err(|e| fail(e.into()))?;
        let old = match sys::obj_get(path) {
            Ok(old) => {
                std::fs::remove_file(path).map_err(|e| fail(e.into()))?;
                Some(old)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(fail(e.into())),
        };
        let pinned = sys::obj_pin(fd, path);
        match old {
            Some(old) => self.steps.push(Step::Repin {
                path: path.to_path_buf(),
                old,
            }),
            None if pinned.is_ok() => self.made_pin(path),
            None => {}
        }
        pinned.map_err(|e| fail(e.into()))
    }

    /// Keeps every change.
    pub(super) fn commit(mut self) {
        self.steps.clear();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        for step in self.steps.drain(..).rev() {
            let result = match &step {
                // A pin the failed step was to make may never have been made.
                Step::Unpin(path) => match std::fs::remove_file(path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                },
                Step::Repin { path, old } => {
                    let _ = std::fs::remove_file(path);
                    sys::obj_pin(old.as_fd(), path).map_err(std::io::Error::other)
                }
                Step::Detach { link, .. } => {
                    sys::link_detach(link.as_fd()).map_err(std::io::Error::other)
                }
                Step::PutBack { link, program, .. } => {
                    sys::link_update(link.as_fd(), program.as_fd()).map_err(std::io::Error::other)
                }
                Step::Rmdir(dir) => std::fs::remove_dir(dir),
            };
            if let Err(e) = result {
                let what = match &step {
                    Step::Unpin(p) | Step::Repin { path: p, .. } | Step::Rmdir(p) => {
                        p.display().to_string()
                    }
                    Step::Detach { hook, .. } | Step::PutBack { hook, .. } => {
                        format!("the {hook} link")
                    }
                };
                tracing::error!("undoing a failed kernel step: {what}: {e}");
            }
        }
    }
}
