//! The solver-facing instance: constraints applied to a cost table.
//!
//! Tie groups are merged into one choice whose options are the formats every member has (costs
//! and resources summed), pins and allowed-format rules remove options, and options dominated in
//! the objective and every constrained resource are dropped. Every solver then works on the same
//! multiple-choice problem: pick one option per group, minimize Σ cost, keep each Σ resource under
//! its limit. Ties and pins therefore hold by construction, whichever solver runs.

use super::budget::{Budget, ResolvedBudget, Resource, Shortfall};
use crate::cost::CostTable;
use crate::error::{Error, Result};
use crate::quant::QuantSpec;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// Layers that must share one format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Tie {
    /// Explicit layer names (`--tie a,b,c`).
    Layers(Vec<String>),
    /// Every layer whose whole name matches the regex (`--tie 're:layer1\..*'`).
    Pattern(String),
}

impl FromStr for Tie {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("re:") {
            return Ok(Tie::Pattern(p.to_string()));
        }
        let names: Vec<String> = s.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
        if names.len() < 2 {
            return Err(Error::invalid("tie", s, "a tie group lists two or more layers (`a,b,c`) or a regex (`re:layer1\\..*`)"));
        }
        Ok(Tie::Layers(names))
    }
}

/// Layers matching `pattern` (a regex over the whole name) use exactly `format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pin {
    /// Regex matched against the whole layer name (an exact name works too).
    pub pattern: String,
    /// The format label.
    pub format: String,
}

impl FromStr for Pin {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (p, f) = s
            .rsplit_once('=')
            .ok_or_else(|| Error::invalid("pin", s, "write PATTERN=FORMAT, e.g. `stem.conv=int8` or `fc|stem\\..*=int8`"))?;
        Ok(Pin { pattern: p.trim().to_string(), format: f.trim().to_string() })
    }
}

/// Layers matching `pattern` may only use `formats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allow {
    /// Regex matched against the whole layer name.
    pub pattern: String,
    /// Allowed format labels.
    pub formats: Vec<String>,
}

impl FromStr for Allow {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (p, f) = s.rsplit_once('=').ok_or_else(|| Error::invalid("allow", s, "write PATTERN=F1,F2, e.g. `layer3\\..*=int2,int4`"))?;
        let formats: Vec<String> = f.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
        if formats.is_empty() {
            return Err(Error::invalid("allow", s, "list at least one format after `=`"));
        }
        Ok(Allow { pattern: p.trim().to_string(), formats })
    }
}

/// Everything an allocation must respect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Constraints {
    /// Budgets (any subset of resources; at most one per resource is meaningful, all are enforced).
    pub budgets: Vec<Budget>,
    /// Tie groups.
    pub ties: Vec<Tie>,
    /// Pinned layers.
    pub pins: Vec<Pin>,
    /// Allowed-format rules (a layer must satisfy every rule that matches it).
    pub allowed: Vec<Allow>,
}

/// One option of a group: the same format label for every member layer.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupOption {
    /// The format label.
    pub format: String,
    /// Σ cost over the members.
    pub cost: f64,
    /// Σ resource over the members, one entry per budget of the problem.
    pub res: Vec<f64>,
    /// Index of this option in each member layer's `options`.
    pub option_index: Vec<usize>,
}

/// Layers that take one decision together (a single layer unless tied).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Indices into the table's layers.
    pub layers: Vec<usize>,
    /// The options left after constraints and dominance pruning.
    pub options: Vec<GroupOption>,
}

/// A multiple-choice instance: one option per group, Σ cost minimal, Σ res ≤ limit per budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The decision groups.
    pub groups: Vec<Group>,
    /// The budgets, resolved (their order is the order of `GroupOption::res`).
    pub budgets: Vec<ResolvedBudget>,
}

fn whole(pattern: &str, what: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| Error::invalid(what, pattern, format!("not a valid regex: {e}")))
}

impl Problem {
    /// Applies `constraints` to `table`. Errors name the tie, pin, rule or budget at fault: a
    /// pattern that matches no layer, a pinned format a layer does not have, a tie group with no
    /// format common to its members, a latency budget on a table without latencies.
    pub fn new(table: &CostTable, constraints: &Constraints) -> Result<Problem> {
        table.validate()?;
        let n = table.layers.len();
        let names: Vec<&str> = table.layers.iter().map(|l| l.name.as_str()).collect();
        // Allowed options per layer.
        let mut allowed: Vec<Vec<bool>> = table.layers.iter().map(|l| vec![true; l.options.len()]).collect();
        for a in &constraints.allowed {
            let re = whole(&a.pattern, "allow pattern")?;
            let formats: Vec<String> = a.formats.iter().map(|f| QuantSpec::canonical_label(f)).collect();
            let mut hit = false;
            for (i, l) in table.layers.iter().enumerate() {
                if re.is_match(&l.name) {
                    hit = true;
                    for (j, o) in l.options.iter().enumerate() {
                        allowed[i][j] &= formats.contains(&QuantSpec::canonical_label(&o.format));
                    }
                }
            }
            if !hit {
                return Err(Error::invalid("allow pattern", &a.pattern, "matches no layer"));
            }
        }
        for p in &constraints.pins {
            let re = whole(&p.pattern, "pin pattern")?;
            let f = QuantSpec::canonical_label(&p.format);
            let mut hit = false;
            for (i, l) in table.layers.iter().enumerate() {
                if re.is_match(&l.name) {
                    hit = true;
                    if !l.options.iter().any(|o| QuantSpec::canonical_label(&o.format) == f) {
                        return Err(Error::invalid(
                            format!("pin of layer `{}`", l.name),
                            &p.format,
                            format!(
                                "the layer has no such candidate (it has {})",
                                l.options.iter().map(|o| o.format.as_str()).collect::<Vec<_>>().join(", ")
                            ),
                        ));
                    }
                    for (j, o) in l.options.iter().enumerate() {
                        allowed[i][j] &= QuantSpec::canonical_label(&o.format) == f;
                    }
                }
            }
            if !hit {
                return Err(Error::invalid("pin pattern", &p.pattern, "matches no layer"));
            }
        }
        for (i, l) in table.layers.iter().enumerate() {
            if !allowed[i].iter().any(|&a| a) {
                return Err(Error::invalid(
                    format!("layer `{}`", l.name),
                    "",
                    "pins and allowed-format rules leave this layer no format; relax one of them",
                ));
            }
        }
        // Tie groups by union-find.
        let mut parent: Vec<usize> = (0..n).collect();
        fn find(p: &mut [usize], x: usize) -> usize {
            let mut r = x;
            while p[r] != r {
                r = p[r];
            }
            let mut y = x;
            while p[y] != r {
                let nx = p[y];
                p[y] = r;
                y = nx;
            }
            r
        }
        for t in &constraints.ties {
            let members: Vec<usize> = match t {
                Tie::Layers(ls) => ls
                    .iter()
                    .map(|name| names.iter().position(|n| n == name).ok_or_else(|| Error::unknown_layer(name, names.iter().copied())))
                    .collect::<Result<_>>()?,
                Tie::Pattern(p) => {
                    let re = whole(p, "tie pattern")?;
                    let m: Vec<usize> = (0..n).filter(|&i| re.is_match(names[i])).collect();
                    if m.is_empty() {
                        return Err(Error::invalid("tie pattern", p, "matches no layer"));
                    }
                    m
                }
            };
            for w in members.windows(2) {
                let (a, b) = (find(&mut parent, w[0]), find(&mut parent, w[1]));
                parent[a.max(b)] = a.min(b);
            }
        }
        let mut group_of: Vec<Option<usize>> = vec![None; n];
        let mut members: Vec<Vec<usize>> = Vec::new();
        for i in 0..n {
            let r = find(&mut parent, i);
            let g = *group_of[r].get_or_insert_with(|| {
                members.push(Vec::new());
                members.len() - 1
            });
            members[g].push(i);
        }
        // Budgets.
        let resources: Vec<Resource> = constraints.budgets.iter().map(|b| b.resource).collect();
        let mut groups = Vec::with_capacity(members.len());
        for m in members {
            let first = &table.layers[m[0]];
            let mut options = Vec::new();
            for (j0, o0) in first.options.iter().enumerate() {
                if !allowed[m[0]][j0] {
                    continue;
                }
                let label = QuantSpec::canonical_label(&o0.format);
                let mut idx = vec![j0];
                for &li in &m[1..] {
                    match table.layers[li].options.iter().position(|o| QuantSpec::canonical_label(&o.format) == label) {
                        Some(j) if allowed[li][j] => idx.push(j),
                        _ => break,
                    }
                }
                if idx.len() != m.len() {
                    continue;
                }
                let mut cost = 0.0;
                let mut res = vec![0.0; resources.len()];
                for (&li, &j) in m.iter().zip(&idx) {
                    let o = &table.layers[li].options[j];
                    cost += o.cost;
                    for (k, r) in resources.iter().enumerate() {
                        res[k] += r.of(o).ok_or_else(|| {
                            Error::invalid(
                                "budget",
                                constraints.budgets[k].to_string(),
                                format!(
                                    "layer `{}` format `{}` has no latency; give a latency table with every layer and format",
                                    table.layers[li].name, o.format
                                ),
                            )
                        })?;
                    }
                }
                options.push(GroupOption { format: o0.format.clone(), cost, res, option_index: idx });
            }
            if options.is_empty() {
                return Err(Error::invalid(
                    "tie group",
                    m.iter().map(|&i| names[i]).collect::<Vec<_>>().join(","),
                    "its layers have no allowed format in common",
                ));
            }
            prune_dominated(&mut options);
            groups.push(Group { layers: m, options });
        }
        let params = table.total_params();
        let mut budgets = Vec::new();
        for (k, b) in constraints.budgets.iter().enumerate() {
            let min: f64 = groups.iter().map(|g| g.options.iter().map(|o| o.res[k]).fold(f64::INFINITY, f64::min)).sum();
            let max: f64 = groups.iter().map(|g| g.options.iter().map(|o| o.res[k]).fold(f64::NEG_INFINITY, f64::max)).sum();
            budgets.push(b.resolve(min, max, params)?);
        }
        let p = Problem { groups, budgets };
        p.check_each_budget(table)?;
        Ok(p)
    }

    /// Σ resource `k` of a choice.
    pub fn usage(&self, choice: &[usize], k: usize) -> f64 {
        self.groups.iter().zip(choice).map(|(g, &j)| g.options[j].res[k]).sum()
    }

    /// Σ cost of a choice.
    pub fn cost(&self, choice: &[usize]) -> f64 {
        self.groups.iter().zip(choice).map(|(g, &j)| g.options[j].cost).sum()
    }

    /// Whether a choice keeps every budget (with a relative tolerance of 1e-9 for rounding).
    pub fn feasible(&self, choice: &[usize]) -> bool {
        (0..self.budgets.len()).all(|k| self.usage(choice, k) <= self.budgets[k].limit + tol(self.budgets[k].limit))
    }

    fn check_each_budget(&self, table: &CostTable) -> Result<()> {
        if self.budgets.iter().all(|b| b.min <= b.limit + tol(b.limit)) {
            return Ok(());
        }
        Err(self.infeasible(table, None))
    }

    /// The infeasibility error ([`Error::Infeasible`]): each budget's limit and the smallest value
    /// any allowed configuration reaches. `joint` explains a set of budgets that is only jointly
    /// infeasible.
    pub fn infeasible(&self, table: &CostTable, joint: Option<&str>) -> Error {
        let params = table.total_params();
        let budgets = self
            .budgets
            .iter()
            .map(|b| {
                let r = b.budget.resource;
                Shortfall {
                    budget: b.budget.to_string(),
                    resource: r,
                    limit: b.limit,
                    min: b.min,
                    limit_display: r.display(b.limit, params),
                    min_display: r.display(b.min, params),
                }
            })
            .collect();
        Error::Infeasible { budgets, joint: joint.map(str::to_string) }
    }
}

/// Tolerance of a limit for floating-point sums.
pub(crate) fn tol(limit: f64) -> f64 {
    1e-9 * limit.abs().max(1.0)
}

/// Drops options that another option beats or equals in cost and every resource (keeping the
/// first of exact duplicates).
fn prune_dominated(options: &mut Vec<GroupOption>) {
    let n = options.len();
    let mut keep = vec![true; n];
    for a in 0..n {
        for b in 0..n {
            if a == b || !keep[b] {
                continue;
            }
            let (oa, ob) = (&options[a], &options[b]);
            let le = ob.cost <= oa.cost && ob.res.iter().zip(&oa.res).all(|(x, y)| x <= y);
            let strict = ob.cost < oa.cost || ob.res.iter().zip(&oa.res).any(|(x, y)| x < y);
            if le && (strict || b < a) {
                keep[a] = false;
                break;
            }
        }
    }
    let mut i = 0;
    options.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}
