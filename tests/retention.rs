//! Property tests of the retention policies (SPEC.md section 2) over random
//! sequences of prefill and decode steps: the invariants hold after every step.

use logquant::retention::{Policy, Pos, Retention};
use proptest::prelude::*;

/// Distances from the newest token of the kept positions, bucketed by powers of two
/// of the window: bucket k holds distances in [W 2^k, W 2^(k+1)).
fn band_counts(kept: &[Pos], len: Pos, w: u32) -> Vec<usize> {
    let mut bands = vec![0usize; 40];
    for &p in kept {
        let d = len - 1 - p;
        if d >= w {
            bands[(d / w).ilog2() as usize] += 1;
        }
    }
    bands
}

fn check_step(r: &Retention, before: &[Pos]) -> Result<(), TestCaseError> {
    let kept = r.full_precision();
    let len = r.len();
    prop_assert!(kept.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    prop_assert!(kept.iter().all(|&p| p < len), "only positions seen");
    prop_assert!(
        kept.len() as u32 <= r.policy().dense_budget(),
        "{} kept, budget {}",
        kept.len(),
        r.policy().dense_budget()
    );
    // Demotion only: a position that left full precision never returns.
    // (`before` is the set before this step; only the newest position is new.)
    for p in &kept {
        prop_assert!(*p + 1 == len || before.binary_search(p).is_ok(), "{p} came back");
    }
    match r.policy() {
        Policy::LogQuant { window } => {
            let newest: Vec<Pos> = (len.saturating_sub(window)..len).collect();
            prop_assert!(newest.iter().all(|p| kept.binary_search(p).is_ok()), "newest W kept");
            // Log-distributed: each band [W 2^k, W 2^(k+1)) of distance holds at most
            // 2W kept tokens, while the band's width grows as 2^k.
            for (k, &c) in band_counts(&kept, len, window.max(1)).iter().enumerate() {
                prop_assert!(c <= 2 * window as usize, "band {k} holds {c}");
            }
        }
        Policy::Octaves { window } => {
            let newest: Vec<Pos> = (len.saturating_sub(window)..len).collect();
            prop_assert!(newest.iter().all(|p| kept.binary_search(p).is_ok()), "newest W kept");
            // A band [W 2^k, W 2^(k+1)) keeps multiples of one power of two of at least
            // 2^k: at most W + 1 of them.
            for (k, &c) in band_counts(&kept, len, window.max(1)).iter().enumerate() {
                prop_assert!(c <= window as usize + 1, "band {k} holds {c}");
            }
        }
        Policy::Kivi { recent } => {
            prop_assert_eq!(kept, (len.saturating_sub(recent)..len).collect::<Vec<_>>());
        }
        Policy::Streaming { sinks, window } => {
            let mut want: Vec<Pos> = (0..sinks.min(len)).collect();
            want.extend((len.saturating_sub(window).max(sinks.min(len)))..len);
            prop_assert_eq!(kept, want);
        }
        Policy::Q2 => prop_assert!(kept.is_empty()),
    }
    Ok(())
}

fn policies() -> impl Strategy<Value = Policy> {
    prop_oneof![
        (0u32..40).prop_map(|w| Policy::LogQuant { window: w }),
        (0u32..40).prop_map(|w| Policy::Octaves { window: w }),
        (0u32..120).prop_map(Policy::kivi),
        (0u32..120).prop_map(Policy::streaming),
        Just(Policy::Q2),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn invariants_hold_at_every_step(policy in policies(), prefill in 0u32..400, steps in 0usize..600) {
        let mut r = Retention::new(policy);
        r.prefill(prefill);
        // After the prefill everything up to it counts as "before".
        check_step(&r, &(0..prefill).collect::<Vec<_>>())?;
        for _ in 0..steps {
            let before = r.full_precision();
            r.decode();
            check_step(&r, &before)?;
        }
    }

    #[test]
    fn prefill_agrees_with_decoding_below_3w_and_keeps_fewer_from_3w(w in 1u32..30, n in 0u32..200) {
        // (W = 0 keeps nothing either way: covered by invariants_hold_at_every_step.)
        let mut pre = Retention::new(Policy::LogQuant { window: w });
        pre.prefill(n);
        let mut dec = Retention::new(Policy::LogQuant { window: w });
        for _ in 0..n {
            dec.decode();
        }
        if n < 3 * w {
            // Both keep everything.
            prop_assert_eq!(pre.full_precision(), (0..n).collect::<Vec<_>>());
            prop_assert_eq!(dec.full_precision(), (0..n).collect::<Vec<_>>());
        } else {
            // The documented difference: both within 3W, both keep the newest W.
            prop_assert!(pre.n_full_precision() <= 3 * w as usize && dec.n_full_precision() <= 3 * w as usize);
            let newest: Vec<Pos> = (n - w..n).collect();
            for p in &newest {
                prop_assert!(pre.full_precision().contains(p) && dec.full_precision().contains(p));
            }
        }
        if n == 3 * w {
            prop_assert_eq!(pre.n_full_precision(), 2 * w as usize);
            prop_assert_eq!(dec.n_full_precision(), 3 * w as usize);
        }
    }

    #[test]
    fn window_policies_prefill_equals_decoding(policy in policies(), n in 0u32..300) {
        prop_assume!(!matches!(policy, Policy::LogQuant { .. }));
        let mut pre = Retention::new(policy);
        pre.prefill(n);
        let mut dec = Retention::new(policy);
        for _ in 0..n {
            dec.decode();
        }
        prop_assert_eq!(pre.full_precision(), dec.full_precision());
    }
}

/// What the rule of SPEC.md section 2, implemented as given, keeps far back: each
/// demotion halves the older sparse set, so the density of kept tokens falls off
/// with distance; the first position of the sparse list survives every halving.
/// (Measured, W = 16 after 20000 steps: octaves [16,32) 16, [32,64) 12, [64,128) 3,
/// then only position 0 — a faster fall-off than one count per octave.)
#[test]
fn logquant_density_falls_off_with_distance() {
    let w = 16;
    let mut r = Retention::new(Policy::LogQuant { window: w });
    for _ in 0..20_000 {
        r.decode();
    }
    let kept = r.full_precision();
    let bands = band_counts(&kept, r.len(), w);
    eprintln!("kept per octave of distance (W = {w}): {:?}", &bands[..12]);
    assert_eq!(kept.len(), 3 * w as usize);
    assert!(bands[0] >= bands[1] && bands[1] >= bands[2] && bands[2] > 0, "{bands:?}");
    assert_eq!(kept[0], 0, "the first sparse position survives every halving");
}

/// The octaves rule holds the log density: after 20000 steps at W = 16 every full
/// octave of distance keeps about the same count (within a factor of 2), and the
/// budget is used at least half.
#[test]
fn octaves_keep_the_same_count_in_every_octave() {
    let w = 16;
    let mut r = Retention::new(Policy::Octaves { window: w });
    for _ in 0..20_000 {
        r.decode();
    }
    let kept = r.full_precision();
    let bands = band_counts(&kept, r.len(), w);
    eprintln!("kept per octave of distance (W = {w}): {:?}", &bands[..12]);
    // Octaves [16 2^k, 16 2^(k+1)) that lie wholly inside 20000 tokens: k = 0..=9.
    let full = &bands[..10];
    let (lo, hi) = (*full.iter().min().unwrap(), *full.iter().max().unwrap());
    assert!(lo > 0 && hi <= 2 * lo, "{full:?}");
    assert!(kept.len() <= 3 * w as usize && kept.len() >= 3 * w as usize / 2, "{} kept", kept.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// A sequence rolled back to nothing is a new sequence: the server reuses them.
    #[test]
    fn truncating_to_zero_starts_afresh(policy in policies(), first in 0u32..2000, second in 0u32..300) {
        let mut r = Retention::new(policy);
        r.prefill(first);
        r.truncate(0, &[]);
        let mut fresh = Retention::new(policy);
        for _ in 0..second {
            r.decode();
            fresh.decode();
        }
        prop_assert_eq!(r, fresh);
    }
}
