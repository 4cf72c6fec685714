//! The firewall's side of running nft: a batch of ours encoded and handed
//! to the [`NftRunner`] (libnftables in process, or `nft -j -f -`; see
//! [`crate::nft`]) as one transaction, our tables listed back, and nft's
//! words turned into our errors.
//!
//! It owns the encoding and nft's words in our errors. It never decides
//! what goes into a batch (the builders do), never picks the way to nft
//! (whoever built the runner did), and never holds the write lock (the
//! [`super::Firewall`] takes it around every write).

use nftables::batch::Batch;
use serde_json::Value;

use crate::nft::{NftCommand, NftFailure, NftRunner};

use super::{FirewallError, TABLE};

/// Runs `batch` as one transaction; `what` names it in errors.
pub(super) async fn run_nft(
    nft: &NftRunner,
    batch: Batch<'_>,
    what: &'static str,
) -> Result<(), FirewallError> {
    let json =
        serde_json::to_string(&batch.to_nftables()).map_err(|e| FirewallError::Encode(e.to_string()))?;
    run(nft, NftCommand::Batch(&json), what)
        .await?
        .map(drop)
        .map_err(|error| FirewallError::Nft {
            what,
            reason: nft_reason(&error),
        })
}

/// `nft -j list table inet sessiongate` with the objects of `netdev
/// sessiongate` appended; `None` when either table is missing.
pub(super) async fn list_table(nft: &NftRunner) -> Result<Option<Value>, FirewallError> {
    let Some(mut listing) = list_one(nft, "inet").await? else {
        return Ok(None);
    };
    let Some(link) = list_one(nft, "netdev").await? else {
        return Ok(None);
    };
    if let (Some(all), Some(more)) = (listing["nftables"].as_array_mut(), link["nftables"].as_array()) {
        all.extend(more.iter().filter(|o| o.get("metainfo").is_none()).cloned());
    }
    Ok(Some(listing))
}

/// `nft -j list table FAMILY sessiongate`; `None` when it is missing.
pub(super) async fn list_one(nft: &NftRunner, family: &str) -> Result<Option<Value>, FirewallError> {
    const WHAT: &str = "listing of the firewall table";
    match run(
        nft,
        NftCommand::Line(&format!("list table {family} {TABLE}")),
        WHAT,
    )
    .await?
    {
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

/// One command through the runner, its failure to run in our words.
async fn run(
    nft: &NftRunner,
    command: NftCommand<'_>,
    what: &'static str,
) -> Result<Result<String, String>, FirewallError> {
    // Timed in the debug log (SESSIOND_LOG=debug): where a start's
    // milliseconds go (docs/benchmarks.md).
    let began = std::time::Instant::now();
    let result = nft.run(command).await.map_err(|failure| match failure {
        NftFailure::Spawn(reason) => FirewallError::Spawn(reason),
        NftFailure::Timeout => FirewallError::Timeout(what),
    });
    tracing::debug!("nft, {what}: {:.1} ms", began.elapsed().as_secs_f64() * 1000.0);
    result
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
