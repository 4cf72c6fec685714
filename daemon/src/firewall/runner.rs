//! Running nft: one JSON batch is one transaction, handed to libnftables
//! in process ([`crate::nft`]) or, when the library is missing, to
//! `nft -j -f -`; and listing our tables back.
//!
//! It owns the way to nft and nft's words in our errors. It never decides
//! what goes into a batch (the builders do) and never holds the write lock
//! (the public operations in the parent take it around every write).

use std::process::Stdio;
use std::time::Duration;

use nftables::batch::Batch;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::nft::Libnftables;

use super::{FirewallError, TABLE};

/// How long one `nft` run may take before we give up on it.
pub(super) const NFT_TIMEOUT: Duration = Duration::from_secs(10);
pub(super) async fn run_nft(batch: Batch<'_>, what: &'static str) -> Result<(), FirewallError> {
    let json =
        serde_json::to_string(&batch.to_nftables()).map_err(|e| FirewallError::Encode(e.to_string()))?;
    nft(NftCommand::Batch(&json), what)
        .await?
        .map(drop)
        .map_err(|error| FirewallError::Nft {
            what,
            reason: nft_reason(&error),
        })
}

/// `nft -j list table inet sessiongate` with the objects of `netdev
/// sessiongate` appended; `None` when either table is missing.
pub(super) async fn list_table() -> Result<Option<Value>, FirewallError> {
    let Some(mut listing) = list_one("inet").await? else {
        return Ok(None);
    };
    let Some(link) = list_one("netdev").await? else {
        return Ok(None);
    };
    if let (Some(all), Some(more)) = (listing["nftables"].as_array_mut(), link["nftables"].as_array()) {
        all.extend(more.iter().filter(|o| o.get("metainfo").is_none()).cloned());
    }
    Ok(Some(listing))
}

/// `nft -j list table FAMILY sessiongate`; `None` when it is missing.
pub(super) async fn list_one(family: &str) -> Result<Option<Value>, FirewallError> {
    const WHAT: &str = "listing of the firewall table";
    match nft(NftCommand::Line(&format!("list table {family} {TABLE}")), WHAT).await? {
        Ok(out) => serde_json::from_str(&out)
            .map(Some)
            .map_err(|e| FirewallError::Listing(e.to_string())),
        Err(error) if error.contains("No such file or directory") => Ok(None),
        Err(error) => Err(FirewallError::Nft {
            what: WHAT,
            reason: nft_reason(&error),
        }),
    }
}

/// One nft command, with JSON output.
enum NftCommand<'a> {
    /// A JSON batch, one transaction (what `nft -j -f -` reads).
    Batch(&'a str),
    /// A command line, e.g. `list table inet sessiongate`.
    Line(&'a str),
}

/// Runs `command` through libnftables in process, or through the `nft`
/// binary when the library is missing ([`crate::nft`]). The outer error:
/// nft could not be run at all; the inner one: nft refused, in its words.
async fn nft(command: NftCommand<'_>, what: &'static str) -> Result<Result<String, String>, FirewallError> {
    if let Some(lib) = Libnftables::get() {
        let (NftCommand::Batch(text) | NftCommand::Line(text)) = command;
        return Ok(lib.run(text));
    }
    let mut nft = Command::new("nft");
    nft.arg("-j")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let input = match command {
        NftCommand::Batch(json) => {
            nft.args(["-f", "-"]).stdin(Stdio::piped());
            Some(json)
        }
        NftCommand::Line(line) => {
            nft.args(line.split_whitespace()).stdin(Stdio::null());
            None
        }
    };
    let mut child = nft.spawn().map_err(|e| FirewallError::Spawn(e.to_string()))?;
    let run = async {
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|e| FirewallError::Spawn(format!("writing the ruleset to nft failed: {e}")))?;
            // Dropping stdin closes it: nft reads to the end, then commits.
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| FirewallError::Spawn(e.to_string()))
    };
    let out = tokio::time::timeout(NFT_TIMEOUT, run)
        .await
        .map_err(|_| FirewallError::Timeout(what))??;
    if out.status.success() {
        return Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Ok(Err(if stderr.trim().is_empty() {
        format!("nft exited with {} and no message", out.status)
    } else {
        stderr.into_owned()
    }))
}

/// nft's own words: its `Error:` lines, each once (it repeats one per
/// command of the batch, and echoes the offending JSON and a `^^^` marker,
/// which we leave out), or else its first line.
pub(super) fn nft_reason(stderr: &str) -> String {
    let mut errors: Vec<&str> = Vec::new();
    // JSON input gives "internal:0:0-0: Error: ...".
    for error in stderr
        .lines()
        .filter_map(|l| l.split_once("Error:").map(|(_, rest)| rest.trim()))
    {
        if !errors.contains(&error) {
            errors.push(error);
        }
    }
    if !errors.is_empty() {
        return errors.join("; ");
    }
    match stderr.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => line.to_string(),
        None => "nft gave no message".to_string(),
    }
}
