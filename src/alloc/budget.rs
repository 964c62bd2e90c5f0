//! Budgets: what a configuration may use, parsed from `--budget` strings.

use crate::cost::CostOption;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A resource a budget limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resource {
    /// Total storage bytes of the quantized weights (scales and zero points included).
    Size,
    /// Average storage bits per weight (total bits / total weights).
    AvgBits,
    /// Bit operations per sample (Σ MACs × weight bits × activation bits).
    Bops,
    /// Σ per-layer latency in microseconds.
    Latency,
}

impl Resource {
    /// All resources.
    pub const ALL: [Resource; 4] = [Resource::Size, Resource::AvgBits, Resource::Bops, Resource::Latency];

    /// The amount of this resource an option uses, in the additive unit the solvers sum: bytes,
    /// storage bits (an avg-bits budget limits Σ bits ≤ avg · Σ weights), BOPs, µs. `None` when the
    /// option has no latency.
    pub fn of(self, o: &CostOption) -> Option<f64> {
        match self {
            Resource::Size => Some(o.bytes as f64),
            Resource::AvgBits => Some(o.bits as f64),
            Resource::Bops => Some(o.bops),
            Resource::Latency => o.latency_us,
        }
    }

    /// Formats an additive amount (as summed by the solvers) for people; `params` converts bits
    /// to bits per weight.
    pub fn display(self, amount: f64, params: i64) -> String {
        match self {
            Resource::Size => crate::cli::table::bytes(amount.max(0.0).round() as u64),
            Resource::AvgBits => format!("{:.3} bits/w", amount / params.max(1) as f64),
            Resource::Bops => format!("{:.4e} BOPs", amount),
            Resource::Latency => {
                if amount >= 1e3 {
                    format!("{:.3} ms", amount / 1e3)
                } else {
                    format!("{amount:.1} µs")
                }
            }
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Size => "size",
            Resource::AvgBits => "avg-bits",
            Resource::Bops => "bops",
            Resource::Latency => "latency",
        })
    }
}

/// A budget's limit as written.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Limit {
    /// An absolute amount in the resource's unit: bytes, bits per weight, BOPs, µs.
    Absolute(f64),
    /// A fraction in [0, 1] of the way from the configuration that uses the least of the resource
    /// (every layer at its smallest allowed option) to the one that uses the most (HAWQ-V3 states
    /// its budgets this way).
    Relative(f64),
}

/// One budget, e.g. `size=2.1MB`, `avg-bits=4.5`, `bops=1.2G`, `latency=3ms`, `size=40%`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// What is limited.
    pub resource: Resource,
    /// The limit.
    pub limit: Limit,
}

const BUDGET_HELP: &str = "write RESOURCE=LIMIT: size=2.1MB (B, KB, MB, GB, KiB, MiB, GiB), avg-bits=4.5, bops=1.2G (K, M, G, T), \
latency=3ms (us, ms, s), or a fraction between the smallest and the largest configuration: size=40%";

fn split_number(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))).unwrap_or(s.len());
    // An `e` followed by a non-digit is a unit, not an exponent (there is none today, but be safe).
    (&s[..end], s[end..].trim())
}

impl FromStr for Budget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |msg: &str| Error::invalid("budget", s, format!("{msg}; {BUDGET_HELP}"));
        let (name, value) = s.split_once('=').ok_or_else(|| bad("missing `=`"))?;
        let resource = match name.trim().to_ascii_lowercase().as_str() {
            "size" | "bytes" | "memory" => Resource::Size,
            "avg-bits" | "avg_bits" | "bits" => Resource::AvgBits,
            "bops" => Resource::Bops,
            "latency" => Resource::Latency,
            _ => return Err(bad("unknown resource (size, avg-bits, bops, latency)")),
        };
        let value = value.trim();
        if let Some(p) = value.strip_suffix('%') {
            let f: f64 = p.trim().parse().map_err(|_| bad("not a percentage"))?;
            if !(0.0..=100.0).contains(&f) {
                return Err(bad("a relative budget is between 0% and 100%"));
            }
            return Ok(Budget { resource, limit: Limit::Relative(f / 100.0) });
        }
        let (num, unit) = split_number(value);
        let x: f64 = num.parse().map_err(|_| bad("not a number"))?;
        if !x.is_finite() || x < 0.0 {
            return Err(bad("the limit must be a finite number ≥ 0"));
        }
        let unit_l = unit.to_ascii_lowercase();
        let mult = match (resource, unit_l.as_str()) {
            (Resource::Size, "" | "b") => 1.0,
            (Resource::Size, "kb") => 1e3,
            (Resource::Size, "mb") => 1e6,
            (Resource::Size, "gb") => 1e9,
            (Resource::Size, "kib") => 1024.0,
            (Resource::Size, "mib") => 1024.0 * 1024.0,
            (Resource::Size, "gib") => 1024.0 * 1024.0 * 1024.0,
            (Resource::AvgBits, "") => 1.0,
            (Resource::Bops, "") => 1.0,
            (Resource::Bops, "k") => 1e3,
            (Resource::Bops, "m") => 1e6,
            (Resource::Bops, "g") => 1e9,
            (Resource::Bops, "t") => 1e12,
            (Resource::Latency, "" | "us" | "µs") => 1.0,
            (Resource::Latency, "ms") => 1e3,
            (Resource::Latency, "s") => 1e6,
            _ => return Err(bad(&format!("unit `{unit}` does not fit resource `{resource}`"))),
        };
        Ok(Budget { resource, limit: Limit::Absolute(x * mult) })
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit {
            Limit::Relative(r) => write!(f, "{}={}%", self.resource, r * 100.0),
            Limit::Absolute(x) => match self.resource {
                Resource::Size => write!(f, "size={x}B"),
                Resource::AvgBits => write!(f, "avg-bits={x}"),
                Resource::Bops => write!(f, "bops={x}"),
                Resource::Latency => write!(f, "latency={x}us"),
            },
        }
    }
}

/// A budget resolved against a table: the limit on the additive amount the solvers sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedBudget {
    /// The budget as given.
    pub budget: Budget,
    /// Limit on Σ (bytes | bits | BOPs | µs).
    pub limit: f64,
    /// The least any allowed configuration uses.
    pub min: f64,
    /// The most any allowed configuration uses.
    pub max: f64,
}

impl Budget {
    /// The additive limit for a table whose allowed configurations use between `min` and `max`
    /// of the resource and which has `params` weights in all.
    pub fn resolve(&self, min: f64, max: f64, params: i64) -> Result<ResolvedBudget> {
        let limit = match self.limit {
            Limit::Relative(r) => min + r * (max - min),
            Limit::Absolute(x) if self.resource == Resource::AvgBits => {
                if params <= 0 {
                    return Err(Error::invalid(
                        "budget",
                        self.to_string(),
                        "an avg-bits budget needs the number of weights of each layer (the `params` column of the cost table)",
                    ));
                }
                x * params as f64
            }
            Limit::Absolute(x) => x,
        };
        Ok(ResolvedBudget { budget: *self, limit, min, max })
    }
}

/// One budget of an infeasible problem: its limit and the least any allowed configuration uses,
/// as carried by [`Error::Infeasible`](crate::Error::Infeasible).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shortfall {
    /// The budget as given (`size=100KB`).
    pub budget: String,
    /// The resource.
    pub resource: Resource,
    /// The limit, in the solvers' additive unit (bytes, bits, BOPs, µs).
    pub limit: f64,
    /// The smallest achievable amount (every layer at its smallest allowed option), same unit.
    pub min: f64,
    /// `limit` for people (`3.000 bits/w`).
    pub limit_display: String,
    /// `min` for people.
    pub min_display: String,
}

impl Shortfall {
    /// Whether this budget alone is out of reach (its limit is below the smallest achievable).
    pub fn below_min(&self) -> bool {
        self.min > self.limit + super::problem::tol(self.limit)
    }
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.below_min() { "below" } else { "within reach of" };
        write!(
            f,
            "{} limit {} is {verdict} the smallest achievable {} (every layer at its smallest allowed format)",
            self.resource, self.limit_display, self.min_display
        )
    }
}
