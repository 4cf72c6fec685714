//! Watches the profiles directory and tells the session when it changes, so
//! edits are picked up without a restart (hot reload).
//!
//! This module owns the file-system watch and nothing else: it never reads
//! or judges a profile (the session does that) and never blocks the session:
//! bursts of events are debounced into one notice, and a full queue drops
//! the notice, since one pending reload covers any number of edits.

use std::path::Path;
use std::time::Duration;

use notify_debouncer_full::notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};

use crate::session::SessionHandle;

/// Editors write a file in several steps; wait for them to settle.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Whether an event can change what a file says: anything but a read.
/// The watch reports opens and read-closes too, and the session reads the
/// running profile on every notice: counting reads made each reload start
/// the next, one every [`DEBOUNCE`] for the whole session (which also kept
/// the session loop too busy for the tamper guard to restart its monitor).
fn is_change(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read))
    )
}

/// Keeps the watch alive; dropping it stops watching.
pub struct ProfileWatcher {
    _debouncer: Debouncer<notify_debouncer_full::notify::RecommendedWatcher, RecommendedCache>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot watch the profiles directory {dir} for changes: {reason}")]
pub struct WatchError {
    dir: String,
    reason: String,
}

impl ProfileWatcher {
    pub fn start(dir: &Path, session: SessionHandle) -> Result<ProfileWatcher, WatchError> {
        let err = |e: notify_debouncer_full::notify::Error| WatchError {
            dir: dir.display().to_string(),
            reason: e.to_string(),
        };
        let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| match result {
            Ok(events) if events.iter().any(|e| is_change(&e.kind)) => session.profiles_changed(),
            Ok(_) => {}
            Err(errors) => {
                for e in errors {
                    tracing::warn!("watching the profiles directory: {e}");
                }
            }
        })
        .map_err(err)?;
        // Key files live in a subdirectory; a rotated key is a change too.
        debouncer.watch(dir, RecursiveMode::Recursive).map_err(err)?;
        Ok(ProfileWatcher {
            _debouncer: debouncer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify_debouncer_full::notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};

    #[test]
    fn reads_are_not_changes_and_writes_are() {
        for read in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
        ] {
            assert!(!is_change(&EventKind::Access(read)), "{read:?}");
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(is_change(&change), "{change:?}");
        }
    }
}
