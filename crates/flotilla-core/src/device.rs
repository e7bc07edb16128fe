//! Device profiles, fleets and the virtual clock.
//!
//! A profile says what one device can do: memory budget, compute speed, link speeds,
//! dropout probability and an optional availability trace. A fleet assigns a profile to
//! every client, from tiers with shares or from a CSV file of per-client profiles.

use crate::CoreError;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What one device can do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// Tier or class name (e.g. `old-pc`).
    pub tier: String,
    /// Memory available for training, bytes.
    pub memory_bytes: u64,
    /// Sustained compute speed, FLOP/s.
    pub flops_per_s: f64,
    /// Uplink bandwidth, bit/s.
    pub uplink_bps: f64,
    /// Downlink bandwidth, bit/s.
    pub downlink_bps: f64,
    /// Probability of dropping out of a round it was selected for.
    #[serde(default)]
    pub dropout: f64,
    /// Availability trace: round r (from 1) uses entry (r - 1) mod len; `false` means offline.
    /// Empty means always available.
    #[serde(default)]
    pub availability: Vec<bool>,
}

impl DeviceProfile {
    /// A device with no practical limits (used when a config describes no fleet).
    pub fn unlimited() -> Self {
        Self {
            tier: "default".into(),
            memory_bytes: u64::MAX,
            flops_per_s: 1e11,
            uplink_bps: 1e9,
            downlink_bps: 1e9,
            dropout: 0.0,
            availability: Vec::new(),
        }
    }

    /// The profile a client declares when it joins, with its name: parsed from JSON,
    /// validated, and the name checked like every peer-supplied label. Errors say which part
    /// is wrong.
    pub fn from_join(profile_json: &str, name: &str) -> Result<DeviceProfile, CoreError> {
        crate::wire::check_label("client name", name)?;
        let profile: DeviceProfile = serde_json::from_str(profile_json)
            .map_err(|e| CoreError::InvalidMessage(format!("device profile: {e}")))?;
        profile
            .validate()
            .map_err(|e| CoreError::InvalidMessage(format!("device profile: {e}")))?;
        Ok(profile)
    }

    /// Checks that every figure is usable.
    pub fn validate(&self) -> Result<(), CoreError> {
        crate::wire::check_label("device tier", &self.tier)
            .map_err(|e| CoreError::Fleet(e.to_string()))?;
        let positive = [
            ("flops_per_s", self.flops_per_s),
            ("uplink_bps", self.uplink_bps),
            ("downlink_bps", self.downlink_bps),
        ];
        for (key, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(CoreError::Fleet(format!(
                    "device tier `{}`: `{key}` must be a positive number, got {v}",
                    self.tier
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.dropout) {
            return Err(CoreError::Fleet(format!(
                "device tier `{}`: `dropout` must be a probability in [0, 1], got {}",
                self.tier, self.dropout
            )));
        }
        if self.memory_bytes == 0 {
            return Err(CoreError::Fleet(format!(
                "device tier `{}`: `memory` must be above zero",
                self.tier
            )));
        }
        Ok(())
    }

    /// Whether the trace lets this device take part in `round` (from 1).
    pub fn available(&self, round: u64) -> bool {
        if self.availability.is_empty() {
            return true;
        }
        let i = ((round.max(1) - 1) % self.availability.len() as u64) as usize;
        self.availability[i]
    }

    /// Seconds to download `bytes`.
    pub fn download_time_s(&self, bytes: u64) -> f64 {
        bytes as f64 * 8.0 / self.downlink_bps
    }

    /// Seconds to upload `bytes`.
    pub fn upload_time_s(&self, bytes: u64) -> f64 {
        bytes as f64 * 8.0 / self.uplink_bps
    }

    /// Seconds to compute `flops`.
    pub fn compute_time_s(&self, flops: f64) -> f64 {
        flops / self.flops_per_s
    }
}

/// A tier of a fleet: a profile and the share of clients that have it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Tier name.
    pub name: String,
    /// Share of the clients in this tier; shares are normalised to sum to one.
    pub share: f64,
    /// Memory budget in MiB.
    pub memory_mib: f64,
    /// Compute speed in GFLOP/s.
    pub gflops: f64,
    /// Uplink in Mbit/s.
    pub uplink_mbps: f64,
    /// Downlink in Mbit/s.
    pub downlink_mbps: f64,
    /// Dropout probability per selected round.
    #[serde(default)]
    pub dropout: f64,
    /// Availability pattern over rounds, e.g. `"1110"` (1 = online); empty = always.
    #[serde(default)]
    pub availability: String,
}

fn parse_availability(s: &str, context: &str) -> Result<Vec<bool>, CoreError> {
    s.chars()
        .map(|c| match c {
            '1' => Ok(true),
            '0' => Ok(false),
            other => Err(CoreError::Fleet(format!(
                "{context}: availability pattern may only hold '0' and '1', found '{other}'"
            ))),
        })
        .collect()
}

impl TierSpec {
    /// The profile of a device in this tier.
    pub fn profile(&self) -> Result<DeviceProfile, CoreError> {
        if !(self.memory_mib.is_finite() && self.memory_mib > 0.0) {
            return Err(CoreError::Fleet(format!(
                "tier `{}`: `memory_mib` must be a positive number, got {}",
                self.name, self.memory_mib
            )));
        }
        let p = DeviceProfile {
            tier: self.name.clone(),
            memory_bytes: (self.memory_mib * 1024.0 * 1024.0) as u64,
            flops_per_s: self.gflops * 1e9,
            uplink_bps: self.uplink_mbps * 1e6,
            downlink_bps: self.downlink_mbps * 1e6,
            dropout: self.dropout,
            availability: parse_availability(&self.availability, &format!("tier `{}`", self.name))?,
        };
        p.validate()?;
        Ok(p)
    }
}

/// Assigns tiers to `num_clients` clients: exact counts by largest remainder, then a seeded
/// shuffle so that tiers are not correlated with client ids (and so with data partitions).
pub fn assign_tiers(
    tiers: &[TierSpec],
    num_clients: usize,
    seed: u64,
) -> Result<Vec<DeviceProfile>, CoreError> {
    if tiers.is_empty() {
        return Err(CoreError::Fleet("a fleet needs at least one tier".into()));
    }
    if let Some(t) = tiers
        .iter()
        .find(|t| !(t.share.is_finite() && t.share >= 0.0))
    {
        return Err(CoreError::Fleet(format!(
            "tier `{}`: `share` must be a non-negative number, got {}",
            t.name, t.share
        )));
    }
    let total: f64 = tiers.iter().map(|t| t.share).sum();
    if total <= 0.0 {
        return Err(CoreError::Fleet("tier shares sum to zero".into()));
    }
    let profiles = tiers
        .iter()
        .map(TierSpec::profile)
        .collect::<Result<Vec<_>, _>>()?;
    let exact: Vec<f64> = tiers
        .iter()
        .map(|t| t.share / total * num_clients as f64)
        .collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..tiers.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    let missing = num_clients - counts.iter().sum::<usize>();
    for &i in order.iter().take(missing) {
        counts[i] += 1;
    }
    let mut out: Vec<DeviceProfile> = counts
        .iter()
        .zip(&profiles)
        .flat_map(|(&n, p)| std::iter::repeat_n(p.clone(), n))
        .collect();
    out.shuffle(&mut crate::seed::rng(
        seed,
        0,
        0,
        crate::seed::Purpose::Fleet,
    ));
    Ok(out)
}

/// Reads per-client profiles from a CSV file with the header
/// `client,tier,memory_mib,gflops,uplink_mbps,downlink_mbps,dropout,availability`
/// (`dropout` and `availability` may be empty). Rows must list clients 0..N-1, each once.
pub fn load_fleet_csv(path: &Path) -> Result<Vec<DeviceProfile>, CoreError> {
    let text = std::fs::read_to_string(path).map_err(|e| CoreError::File {
        path: path.into(),
        message: format!("cannot read the fleet CSV: {e}"),
    })?;
    parse_fleet_csv(&text).map_err(|message| CoreError::File {
        path: path.into(),
        message,
    })
}

/// Parses the CSV format of [`load_fleet_csv`].
pub fn parse_fleet_csv(text: &str) -> Result<Vec<DeviceProfile>, String> {
    const HEADER: [&str; 8] = [
        "client",
        "tier",
        "memory_mib",
        "gflops",
        "uplink_mbps",
        "downlink_mbps",
        "dropout",
        "availability",
    ];
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    let (_, header) = lines
        .next()
        .ok_or("the fleet CSV is empty; it needs a header line")?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    if cols != HEADER {
        return Err(format!(
            "the header must be `{}`, found `{header}`",
            HEADER.join(",")
        ));
    }
    let mut rows: Vec<Option<DeviceProfile>> = Vec::new();
    for (lineno, line) in lines {
        let at = |msg: String| format!("line {}: {msg}", lineno + 1);
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != HEADER.len() {
            return Err(at(format!(
                "expected {} fields, found {}",
                HEADER.len(),
                f.len()
            )));
        }
        let num = |i: usize| -> Result<f64, String> {
            f[i].parse::<f64>().map_err(|_| {
                at(format!(
                    "`{}` must be a number, found `{}`",
                    HEADER[i], f[i]
                ))
            })
        };
        let client: usize = f[0]
            .parse()
            .map_err(|_| at(format!("`client` must be a client index, found `{}`", f[0])))?;
        let tier = TierSpec {
            name: f[1].to_string(),
            share: 1.0,
            memory_mib: num(2)?,
            gflops: num(3)?,
            uplink_mbps: num(4)?,
            downlink_mbps: num(5)?,
            dropout: if f[6].is_empty() { 0.0 } else { num(6)? },
            availability: f[7].to_string(),
        };
        let profile = tier.profile().map_err(|e| at(e.to_string()))?;
        if client >= rows.len() {
            rows.resize(client + 1, None);
        }
        if rows[client].replace(profile).is_some() {
            return Err(at(format!("client {client} is listed twice")));
        }
    }
    rows.into_iter()
        .enumerate()
        .map(|(i, p)| {
            p.ok_or_else(|| format!("client {i} is missing; rows must list clients 0..N-1"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(name: &str, share: f64) -> TierSpec {
        TierSpec {
            name: name.into(),
            share,
            memory_mib: 64.0,
            gflops: 1.0,
            uplink_mbps: 1.0,
            downlink_mbps: 10.0,
            dropout: 0.0,
            availability: String::new(),
        }
    }

    #[test]
    fn shares_give_exact_counts_and_seeded_order() {
        let tiers = [tier("weak", 0.3), tier("mid", 0.5), tier("strong", 0.2)];
        let a = assign_tiers(&tiers, 10, 7).unwrap();
        let count = |n: &str| a.iter().filter(|p| p.tier == n).count();
        assert_eq!((count("weak"), count("mid"), count("strong")), (3, 5, 2));
        assert_eq!(a, assign_tiers(&tiers, 10, 7).unwrap());
        assert_ne!(a, assign_tiers(&tiers, 10, 8).unwrap());
        assert_eq!(assign_tiers(&tiers, 7, 1).unwrap().len(), 7);
    }

    #[test]
    fn clock_formulas() {
        let p = tier("x", 1.0).profile().unwrap();
        assert_eq!(p.upload_time_s(125_000), 1.0); // 1 Mbit at 1 Mbit/s
        assert_eq!(p.download_time_s(1_250_000), 1.0);
        assert_eq!(p.compute_time_s(2e9), 2.0);
    }

    #[test]
    fn availability_cycles() {
        let mut t = tier("x", 1.0);
        t.availability = "110".into();
        let p = t.profile().unwrap();
        let seen: Vec<bool> = (1..=6).map(|r| p.available(r)).collect();
        assert_eq!(seen, [true, true, false, true, true, false]);
        t.availability = "1a".into();
        assert!(t.profile().is_err());
    }

    #[test]
    fn invalid_profiles_are_refused() {
        let mut t = tier("x", 1.0);
        t.dropout = 1.5;
        assert!(t.profile().unwrap_err().to_string().contains("dropout"));
        let mut t = tier("x", 1.0);
        t.gflops = 0.0;
        assert!(t.profile().unwrap_err().to_string().contains("flops_per_s"));
    }

    #[test]
    fn csv_fleet() {
        let csv = "client,tier,memory_mib,gflops,uplink_mbps,downlink_mbps,dropout,availability\n\
                   1,board,32,0.5,0.25,1,0.1,10\n0,pc,4096,50,100,100,,\n";
        let f = parse_fleet_csv(csv).unwrap();
        assert_eq!(f[0].tier, "pc");
        assert_eq!(f[1].availability, vec![true, false]);
        assert!(parse_fleet_csv("client,tier\n").is_err());
        let missing = "client,tier,memory_mib,gflops,uplink_mbps,downlink_mbps,dropout,availability\n1,a,1,1,1,1,,\n";
        assert!(
            parse_fleet_csv(missing)
                .unwrap_err()
                .contains("client 0 is missing")
        );
        let bad = "client,tier,memory_mib,gflops,uplink_mbps,downlink_mbps,dropout,availability\n0,a,x,1,1,1,,\n";
        assert!(parse_fleet_csv(bad).unwrap_err().contains("line 2"));
    }
}
