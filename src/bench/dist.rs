//! Random offsets with fio's `random_distribution` models, ported from
//! fio 3.33 (`lib/zipf.c`, `lib/gauss.c`): the same formulas, the same
//! scattering of hot blocks over the range (fio multiplies the drawn rank
//! by a golden-ratio constant and adds a random offset), so a job file
//! gives the same kind of skew here as under fio. Uniform 32-bit draws come
//! from our seeded RNG, not fio's Tausworthe generator, so the sequence is
//! repeatable per seed but not fio's exact sequence.

use super::job::Distribution;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// fio caps the zeta sum at this many terms (`ZIPF_MAX_GEN`).
const ZIPF_MAX_GEN: u64 = 10_000_000;
/// fio's `GOLDEN_RATIO_64` (`hash.h`, `__hash_u64`).
const GOLDEN_RATIO_64: u64 = 0x61C8_8646_80B5_83EB;
/// fio sums this many uniform draws for `normal` (`GAUSS_ITERS`).
const GAUSS_ITERS: u64 = 12;
const FRAND32_MAX: f64 = u32::MAX as f64;

/// Draws range indexes in `0..nranges`.
pub struct OffsetGen {
    rng: SmallRng,
    nranges: u64,
    model: Model,
    rand_off: u64,
}

enum Model {
    Uniform,
    Zipf { theta: f64, zetan: f64, zeta2: f64 },
    Pareto { pow: f64 },
    Gauss { stddev: u64, rand_off: i64 },
}

impl OffsetGen {
    /// `nranges` ranges (fio: the region in units of the smallest block
    /// size), drawn with `dist`, seeded with `seed`.
    pub fn new(dist: Distribution, nranges: u64, seed: u64) -> OffsetGen {
        let nranges = nranges.max(1);
        let mut rng = SmallRng::seed_from_u64(seed);
        let rand_off_for = |rng: &mut SmallRng, center: Option<f64>| match center {
            Some(c) => (nranges as f64 * c) as u64,
            None => u64::from(rng.gen::<u32>()),
        };
        let (model, rand_off) = match dist {
            Distribution::Random => (Model::Uniform, 0),
            Distribution::Zipf { theta, center } => {
                let off = rand_off_for(&mut rng, center);
                let to_gen = nranges.min(ZIPF_MAX_GEN);
                let zetan: f64 = (0..to_gen)
                    .map(|i| (1.0 / (i + 1) as f64).powf(theta))
                    .sum();
                let zeta2 = 1.0f64.powf(theta) + 0.5f64.powf(theta);
                (
                    Model::Zipf {
                        theta,
                        zetan,
                        zeta2,
                    },
                    off,
                )
            }
            Distribution::Pareto { h, center } => {
                let off = rand_off_for(&mut rng, center);
                (
                    Model::Pareto {
                        pow: h.ln() / (1.0 - h).ln(),
                    },
                    off,
                )
            }
            Distribution::Normal { dev, center } => {
                let mut stddev = 0;
                if dev != 0.0 {
                    stddev = ((nranges as f64 * dev) / 100.0).ceil() as u64;
                    stddev = stddev.min(nranges / 2);
                }
                let rand_off = match center {
                    None => 0,
                    Some(c) => (nranges as f64 * (c - 0.5)) as i64,
                };
                (Model::Gauss { stddev, rand_off }, 0)
            }
        };
        OffsetGen {
            rng,
            nranges,
            model,
            rand_off,
        }
    }

    fn rand32(&mut self) -> u32 {
        self.rng.gen()
    }

    /// The next range index, `0..nranges`: a rank drawn from the model,
    /// scattered over the range as fio does.
    pub fn next_index(&mut self) -> u64 {
        let n = self.nranges;
        let rank = self.next_rank();
        match self.model {
            Model::Uniform => rank,
            Model::Gauss { rand_off, .. } => {
                let hashed = rank.wrapping_mul(GOLDEN_RATIO_64);
                (hashed as i128 + rand_off as i128).rem_euclid(n as i128) as u64
            }
            _ => {
                rank.wrapping_mul(GOLDEN_RATIO_64)
                    .wrapping_add(self.rand_off)
                    % n
            }
        }
    }

    /// The model's draw before fio's scattering (0 is the hottest rank
    /// for zipf and pareto, the middle of the range for normal).
    pub fn next_rank(&mut self) -> u64 {
        let n = self.nranges;
        match self.model {
            Model::Uniform => self.rng.gen_range(0..n),
            Model::Zipf {
                theta,
                zetan,
                zeta2,
            } => {
                let alpha = 1.0 / (1.0 - theta);
                let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
                let rand_uni = f64::from(self.rand32()) / FRAND32_MAX;
                let rand_z = rand_uni * zetan;
                let val: u64 = if rand_z < 1.0 {
                    1
                } else if rand_z < 1.0 + 0.5f64.powf(theta) {
                    2
                } else {
                    1 + (n as f64 * (eta * rand_uni - eta + 1.0).powf(alpha)) as u64
                };
                val - 1
            }
            Model::Pareto { pow } => {
                let r = f64::from(self.rand32()) / FRAND32_MAX;
                ((n - 1) as f64 * r.powf(pow)) as u64
            }
            Model::Gauss { stddev, .. } => {
                let mut sum: u64 = 0;
                for _ in 0..GAUSS_ITERS {
                    sum += u64::from(self.rand32()) % (n + 1);
                }
                sum = sum.div_ceil(GAUSS_ITERS);
                if stddev > 0 {
                    let r = f64::from(self.rand32());
                    let vr = (stddev as f64 * (r / (FRAND32_MAX + 1.0))) as i64;
                    let mut dev = vr - (stddev / 2) as i64;
                    // fio adds a signed deviation to an unsigned sum: a
                    // result below 0 wraps, so it is out of range too.
                    while dev != 0 {
                        let v = sum as i64 + dev;
                        if v >= 0 && (v as u64) < n {
                            break;
                        }
                        dev /= 2;
                    }
                    sum = (sum as i64 + dev) as u64;
                }
                sum
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Share of all draws that land on the most-drawn `top` indexes.
    fn top_share(g: &mut OffsetGen, n: u64, draws: usize, top: usize) -> f64 {
        top_share_of(|| g.next_index(), n, draws, top)
    }

    fn top_share_of(mut draw: impl FnMut() -> u64, n: u64, draws: usize, top: usize) -> f64 {
        // Ranks may reach n (fio's zipf can draw rank n before its modulo).
        let mut hits = vec![0u64; n as usize + 1];
        for _ in 0..draws {
            let i = draw();
            assert!(i <= n, "{i} out of 0..{n}");
            hits[i as usize] += 1;
        }
        hits.sort_unstable_by(|a, b| b.cmp(a));
        hits[..top].iter().sum::<u64>() as f64 / draws as f64
    }

    /// The zipf share of the `k` most popular of `n` items: H(k,θ)/H(n,θ).
    fn zipf_expected(k: u64, n: u64, theta: f64) -> f64 {
        let h = |m: u64| (1..=m).map(|i| (i as f64).powf(-theta)).sum::<f64>();
        h(k) / h(n)
    }

    #[test]
    fn zipf_top_ten_percent_gets_the_zipf_share() {
        let n = 10_000;
        for theta in [0.8, 1.2] {
            let mut g = OffsetGen::new(
                Distribution::Zipf {
                    theta,
                    center: None,
                },
                n,
                7,
            );
            let draws = 400_000;
            let got = top_share_of(|| g.next_rank(), n, draws, (n / 10) as usize);
            let want = zipf_expected(n / 10, n, theta);
            assert!(
                (got - want).abs() < 0.03,
                "theta {theta}: top 10% got {got:.3}, zipf says {want:.3}"
            );
            // Scattered over the range the hot set is the same size or
            // smaller (fio's hash can fold two ranks onto one block), so
            // the busiest 10 % of blocks get at least that share.
            let scattered = top_share(&mut g, n, draws, (n / 10) as usize);
            assert!(scattered >= want - 0.03, "{scattered:.3} vs {want:.3}");
        }
    }

    #[test]
    fn uniform_is_flat_and_seeds_repeat() {
        let n = 1000;
        let mut g = OffsetGen::new(Distribution::Random, n, 1);
        let got = top_share(&mut g, n, 200_000, 100);
        // 10 % of the indexes: about 10 % of the draws (the busiest ones a
        // little more by chance).
        assert!((0.10..0.12).contains(&got), "{got}");
        let draws = |seed| {
            let zipf = Distribution::Zipf {
                theta: 1.1,
                center: None,
            };
            let mut g = OffsetGen::new(zipf, n, seed);
            (0..100).map(|_| g.next_index()).collect::<Vec<u64>>()
        };
        let (a, b, c) = (draws(42), draws(42), draws(43));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn pareto_concentrates_as_its_power_says() {
        // fio's pareto: rank = (n-1) * u^(ln h / ln(1-h)); the lowest
        // k ranks are hit with probability (k/(n-1))^(1/pow).
        let n = 10_000u64;
        let h: f64 = 0.2;
        let pow = h.ln() / (1.0 - h).ln();
        let mut g = OffsetGen::new(Distribution::Pareto { h, center: None }, n, 3);
        let got = top_share_of(|| g.next_rank(), n, 300_000, (n / 10) as usize);
        let want = (0.1f64).powf(1.0 / pow);
        assert!((got - want).abs() < 0.03, "got {got:.3} want {want:.3}");
        assert!(got > 0.5, "pareto:0.2 is skewed: {got}");
    }

    #[test]
    fn normal_spread_follows_the_deviation() {
        // dev=0: fio's normal is the mean of 12 uniform draws, standard
        // deviation n/12. The hottest 10 % of positions are the middle
        // ±0.05n = ±0.6 sigma, which hold erf(0.6/sqrt 2) ≈ 45 % of draws.
        let n = 10_000u64;
        let mut g = OffsetGen::new(
            Distribution::Normal {
                dev: 0.0,
                center: None,
            },
            n,
            9,
        );
        let got = top_share_of(|| g.next_rank(), n, 300_000, (n / 10) as usize);
        assert!((0.40..0.50).contains(&got), "{got}");
        let mean = (0..100_000).map(|_| g.next_rank() as f64).sum::<f64>() / 1e5;
        assert!((mean - n as f64 / 2.0).abs() < n as f64 * 0.01, "{mean}");
        // A wide extra deviation (60 % of the range) flattens it.
        let mut g = OffsetGen::new(
            Distribution::Normal {
                dev: 60.0,
                center: None,
            },
            n,
            9,
        );
        let wide = top_share_of(|| g.next_rank(), n, 300_000, (n / 10) as usize);
        assert!(wide < got - 0.1, "dev 60 {wide} vs dev 0 {got}");
    }

    #[test]
    fn indexes_stay_in_range_for_tiny_ranges() {
        for dist in [
            Distribution::Random,
            Distribution::Zipf {
                theta: 1.2,
                center: Some(0.5),
            },
            Distribution::Pareto {
                h: 0.9,
                center: Some(1.0),
            },
            Distribution::Normal {
                dev: 99.0,
                center: Some(0.0),
            },
        ] {
            for n in [1u64, 2, 3, 17] {
                let mut g = OffsetGen::new(dist, n, 5);
                for _ in 0..2000 {
                    assert!(g.next_index() < n, "{dist:?} n={n}");
                }
            }
        }
    }
}
