//! Memory readings for the soak: the agent's RSS, its namespace's TCP sockets, the kernel's TCP
//! memory and slab, and the rule that decides whether memory "keeps growing".

use crate::procfs::{kib_line, sockstat_field};

/// One sample. Kernel-wide figures (TCP mem, slab) include everything else on the machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Agent `VmRSS`, KiB.
    pub rss_kib: u64,
    /// TCP sockets in use in the agent's network namespace (`/proc/<pid>/net/sockstat`).
    pub tcp_inuse: u64,
    /// Kernel-wide TCP buffer memory, pages (`sockstat` `TCP: ... mem`).
    pub tcp_mem_pages: u64,
    /// Kernel-wide unreclaimable slab, KiB (`/proc/meminfo` `SUnreclaim`: socket and skb caches live here).
    pub sunreclaim_kib: u64,
    /// Kernel-wide slab, KiB (reported only: reclaimable caches move with unrelated file activity).
    pub slab_kib: u64,
}

/// Reads everything; `None` when the agent is gone (its /proc entry vanished).
pub fn sample(agent_pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{agent_pid}/status")).ok()?;
    let sockstat = std::fs::read_to_string(format!("/proc/{agent_pid}/net/sockstat")).ok()?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(Sample {
        rss_kib: kib_line(&status, "VmRSS:")?,
        tcp_inuse: sockstat_field(&sockstat, "TCP:", "inuse")?,
        tcp_mem_pages: sockstat_field(&sockstat, "TCP:", "mem")?,
        sunreclaim_kib: kib_line(&meminfo, "SUnreclaim:")?,
        slab_kib: kib_line(&meminfo, "Slab:")?,
    })
}

/// Kernel-wide TCP buffer memory, pages (`/proc/net/sockstat` `TCP: ... mem`: the same count in
/// every network namespace). `None` when it cannot be read.
pub fn tcp_mem_pages() -> Option<u64> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    sockstat_field(&sockstat, "TCP:", "mem")
}

/// The growth rule for one series, sampled at a fixed interval after warm-up: it "keeps growing" when
/// the median of each quarter of the run is above the one before *and* the last quarter's median is
/// above the first post-warm-up one by more than `abs + rel * first`. A one-off spike (a burst of
/// big flows, another process on the machine) does not fail the run; steady growth does.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
}

#[derive(Debug)]
pub struct Verdict {
    pub quarters: [f64; 4],
    pub growth: f64,
    pub allowed: f64,
    pub keeps_growing: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `None` with fewer than 8 samples (too few to speak of a trend).
pub fn judge(samples: &[f64], tol: Tolerance) -> Option<Verdict> {
    if samples.len() < 8 {
        return None;
    }
    let q = samples.len() / 4;
    let mut quarters = [0.0; 4];
    for (i, m) in quarters.iter_mut().enumerate() {
        let end = if i == 3 { samples.len() } else { (i + 1) * q };
        *m = median(&mut samples[i * q..end].to_vec());
    }
    let growth = quarters[3] - quarters[0];
    let allowed = tol.abs + tol.rel * quarters[0];
    let monotone = quarters.windows(2).all(|w| w[1] > w[0]);
    Some(Verdict {
        quarters,
        growth,
        allowed,
        keeps_growing: monotone && growth > allowed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: Tolerance = Tolerance {
        abs: 10.0,
        rel: 0.1,
    };

    #[test]
    fn steady_growth_fails_flat_and_spikes_pass() {
        let grow: Vec<f64> = (0..40).map(|i| 100.0 + 2.0 * f64::from(i)).collect();
        assert!(judge(&grow, TOL).expect("enough samples").keeps_growing);
        let flat: Vec<f64> = (0..40).map(|i| 100.0 + f64::from(i % 3)).collect();
        assert!(!judge(&flat, TOL).expect("enough samples").keeps_growing);
        let mut spike = flat.clone();
        spike[39] = 10_000.0;
        assert!(!judge(&spike, TOL).expect("enough samples").keeps_growing);
        let slow: Vec<f64> = (0..40).map(|i| 100.0 + 0.1 * f64::from(i)).collect();
        assert!(
            !judge(&slow, TOL).expect("enough samples").keeps_growing,
            "growth within tolerance"
        );
        assert!(judge(&flat[..5], TOL).is_none());
    }
}
