//! The front of one budget: evenly spaced budgets or every exact breakpoint, each point's
//! allocation, optionally re-solved with nominal costs (robust mode) and measured on data; as a
//! versioned CSV (`# mixq.pareto-front version 1`) and as plot series.

use crate::alloc::{
    breakpoints, compare_allocations, solve_problem, Allocation, Budget, Constraints, Limit, Problem, Resource, SolverKind,
};
use crate::cost::CostTable;
use crate::error::{Error, Result};
use crate::eval::{self, Metrics, Reference, SizeReport};
use crate::model::data::Dataset;
use crate::model::QuantModel;
use crate::plot::Series;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// `format` of a front CSV, written on its first line as `# mixq.pareto-front version 1`.
pub const FRONT_FORMAT: &str = "mixq.pareto-front";
/// The front CSV version this build writes and reads.
pub const FRONT_VERSION: u64 = 1;

/// How the front is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// This many evenly spaced budgets from the smallest to the largest configuration (≥ 2).
    Points(usize),
    /// Every exact breakpoint, at most this many (the ones with the most resource).
    Breakpoints(usize),
}

/// Under robust costs, what a point's allocation gives against the nominal costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RobustPoint {
    /// Σ nominal Ω of the point's (robust) allocation.
    pub objective_nominal_costs: f64,
    /// The nominal optimum at the same budget.
    pub nominal_optimum: f64,
    /// Layers whose format differs from the nominal optimum.
    pub changed_layers: usize,
}

/// One point of the front.
#[derive(Debug, Clone)]
pub struct FrontPoint {
    /// Where its budget lies between the smallest (0) and largest (1) configuration.
    pub fraction: f64,
    /// The budget's limit (raw units: bytes, bits, BOPs, µs).
    pub limit: f64,
    /// The optimal allocation at that budget.
    pub alloc: Allocation,
    /// Under robust costs, the comparison with nominal costs.
    pub robust: Option<RobustPoint>,
    /// When measured, its metrics and size.
    pub measured: Option<(Metrics, SizeReport)>,
}

impl FrontPoint {
    /// How many layers use each format, e.g. `int4:3 int8:7`.
    pub fn mix(&self) -> String {
        let mut mix: BTreeMap<&str, usize> = BTreeMap::new();
        for l in &self.alloc.layers {
            *mix.entry(l.format.as_str()).or_default() += 1;
        }
        mix.iter().map(|(f, n)| format!("{f}:{n}")).collect::<Vec<_>>().join(" ")
    }
}

/// A front of one budget.
#[derive(Debug, Clone)]
pub struct Front {
    /// The swept resource.
    pub resource: Resource,
    /// Quantizable weights of the table (avg-bits is bits over these).
    pub params: i64,
    /// How it was sampled.
    pub sampling: Sampling,
    /// The robust z, when the points were solved over robust costs.
    pub robust_z: Option<f64>,
    /// The points, by resource.
    pub points: Vec<FrontPoint>,
    /// Sampled budgets that had no solution (point index, fraction, the solver's error).
    pub failed: Vec<(usize, f64, String)>,
    /// With breakpoints: false when there were more than the maximum asked for.
    pub complete: bool,
    /// The largest gap of any solve (breakpoints are certified when it is below
    /// [`crate::alloc::front::SAME_OBJECTIVE_RTOL`]).
    pub max_gap: f64,
    /// Solver calls made.
    pub solves: usize,
    /// When measured: the FP32 model's metrics and the data's name.
    pub fp32: Option<(Metrics, String)>,
}

/// The front of `resource` over `table` (or, with `robust` = (z, upper-bound table), over the
/// robust costs, each point compared with the nominal optimum at its budget), with the budgets of
/// `cons` held at every point.
pub fn pareto_front(
    table: &CostTable,
    robust: Option<&(f64, CostTable)>,
    cons: &Constraints,
    resource: Resource,
    sampling: Sampling,
    solver: SolverKind,
) -> Result<Front> {
    if let Sampling::Points(n) = sampling {
        if n < 2 {
            return Err(Error::invalid("points", n.to_string(), "a sampled front needs at least 2 points"));
        }
    }
    let mut cons = cons.clone();
    cons.budgets.insert(0, Budget { resource, limit: Limit::Relative(1.0) });
    // The table solved: the robust one under robust costs.
    let solved = robust.map(|(_, t)| t).unwrap_or(table);
    let params = solved.total_params();
    let problem = Problem::new(solved, &cons)?;
    let solver_impl = solver.solver(problem.budgets.len());
    let (min, max) = (problem.budgets[0].min, problem.budgets[0].max);
    let fraction_of = |used: f64| if max > min { (used - min) / (max - min) } else { 0.0 };
    let mut front = Front {
        resource,
        params,
        sampling,
        robust_z: robust.map(|(z, _)| *z),
        points: Vec::new(),
        failed: Vec::new(),
        complete: true,
        max_gap: 0.0,
        solves: 0,
        fp32: None,
    };
    match sampling {
        Sampling::Breakpoints(max_points) => {
            let bp = breakpoints(solved, &problem, 0, solver_impl.as_ref(), max_points)?;
            front.complete = bp.complete;
            front.max_gap = bp.max_gap;
            front.solves = bp.solves;
            for alloc in bp.points {
                let used = alloc.budgets[0].used;
                front.points.push(FrontPoint { fraction: fraction_of(used), limit: used, alloc, robust: None, measured: None });
            }
        }
        Sampling::Points(n) => {
            let mut p = problem.clone();
            for i in 0..n {
                let fraction = i as f64 / (n - 1) as f64;
                p.budgets[0].limit = min + fraction * (max - min);
                front.solves += 1;
                match solve_problem(solved, &p, solver_impl.as_ref()) {
                    Ok(alloc) => {
                        front.max_gap = front.max_gap.max(alloc.gap);
                        front.points.push(FrontPoint { fraction, limit: p.budgets[0].limit, alloc, robust: None, measured: None })
                    }
                    Err(e) => front.failed.push((i, fraction, e.to_string())),
                }
            }
        }
    }
    if let Some((z, rt)) = robust {
        let mut pn = Problem::new(table, &cons)?;
        for pt in &mut front.points {
            pn.budgets[0].limit = pt.limit;
            let nominal = solve_problem(table, &pn, solver_impl.as_ref())?;
            let cmp = compare_allocations(table, rt, *z, nominal, pt.alloc.clone())?;
            pt.robust = Some(RobustPoint {
                objective_nominal_costs: cmp.robust_under_nominal,
                nominal_optimum: cmp.nominal.objective,
                changed_layers: cmp.changed.len(),
            });
        }
    }
    Ok(front)
}

impl Front {
    /// Measures every point's config on `data` (accuracy, loss, KL vs FP32, agreement);
    /// `progress` sees each point before it is measured.
    pub fn measure(&mut self, model: &dyn QuantModel, data: &Dataset, progress: &mut dyn FnMut(&FrontPoint)) -> Result<()> {
        let reference = Reference::compute(model, data)?;
        let base = eval::evaluate(model, data, &reference)?;
        let (resource, params) = (self.resource, self.params);
        for pt in &mut self.points {
            progress(pt);
            let cfg = pt.alloc.to_config(None)?;
            let measured = eval::evaluate_config(model, data, &reference, &cfg)
                .map_err(|e| e.context(format!("evaluating the point at {}", resource.display(pt.alloc.budgets[0].used, params))))?;
            pt.measured = Some(measured);
        }
        self.fp32 = Some((base, data.name.clone()));
        Ok(())
    }

    /// A raw resource amount in the CSV's and plot's unit (avg-bits: bits per weight).
    pub fn unit(&self, x: f64) -> f64 {
        if self.resource == Resource::AvgBits {
            x / self.params.max(1) as f64
        } else {
            x
        }
    }

    /// The front as CSV: a `# mixq.pareto-front version 1` line, the header, one row per point;
    /// robust and measured columns when present.
    pub fn to_csv(&self) -> String {
        let r = self.resource.to_string().replace('-', "_");
        let mut csv = format!("# {FRONT_FORMAT} version {FRONT_VERSION}\n");
        let _ = write!(csv, "point,fraction,{r}_limit,{r}_used,objective,gap,bytes,avg_bits,formats");
        if self.robust_z.is_some() {
            csv.push_str(",objective_nominal_costs,nominal_optimum,changed_layers");
        }
        let measured = self.fp32.is_some();
        if measured {
            csv.push_str(",accuracy,loss,loss_increase,kl,agreement");
        }
        csv.push('\n');
        let base_loss = self.fp32.as_ref().map(|(b, _)| b.loss).unwrap_or(0.0);
        for (i, p) in self.points.iter().enumerate() {
            let _ = write!(
                csv,
                "{i},{},{},{},{},{},{},{},{}",
                p.fraction,
                self.unit(p.limit),
                self.unit(p.alloc.budgets[0].used),
                p.alloc.objective,
                p.alloc.gap,
                p.alloc.total_bytes(),
                p.alloc.avg_bits().map(|b| b.to_string()).unwrap_or_default(),
                p.mix()
            );
            if let Some(rp) = p.robust {
                let _ = write!(csv, ",{},{},{}", rp.objective_nominal_costs, rp.nominal_optimum, rp.changed_layers);
            }
            if let Some((m, _)) = &p.measured {
                let acc = m.accuracy.map(|x| x.to_string()).unwrap_or_default();
                let _ = write!(csv, ",{acc},{},{},{},{}", m.loss, m.loss - base_loss, m.kl, m.agreement);
            }
            csv.push('\n');
        }
        csv
    }

    /// The plot of the front: predicted Σ Ω (a step function for breakpoints), the nominal
    /// optimum under robust costs, and the measured KL on the right axis when measured; with
    /// the x-axis label.
    pub fn series(&self) -> (Vec<Series>, &'static str) {
        let xlabel = match self.resource {
            Resource::Size => "size (bytes)",
            Resource::AvgBits => "average bits per weight",
            Resource::Bops => "BOPs per sample",
            Resource::Latency => "latency (µs)",
        };
        let x: Vec<f64> = self.points.iter().map(|p| self.unit(p.alloc.budgets[0].used)).collect();
        let robust = self.robust_z.is_some();
        let mut series = vec![Series {
            label: if robust { "predicted Σ Ω (robust costs)".into() } else { "predicted Σ Ω".into() },
            xy: x.iter().zip(&self.points).map(|(&x, p)| (x, p.alloc.objective)).collect(),
            right: false,
            step: matches!(self.sampling, Sampling::Breakpoints(_)),
            color: "#1f77b4",
        }];
        if robust {
            series.push(Series {
                label: "nominal optimum Σ Ω".into(),
                xy: x.iter().zip(&self.points).filter_map(|(&x, p)| p.robust.map(|rp| (x, rp.nominal_optimum))).collect(),
                right: false,
                step: false,
                color: "#2ca02c",
            });
        }
        if self.fp32.is_some() {
            series.push(Series {
                label: "measured KL(FP32‖Q)".into(),
                xy: x.iter().zip(&self.points).filter_map(|(&x, p)| p.measured.map(|(m, _)| (x, m.kl))).collect(),
                right: true,
                step: false,
                color: "#d62728",
            });
        }
        (series, xlabel)
    }
}

/// A front CSV read back: its header and rows (as text), after checking its format line.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontCsv {
    /// Column names.
    pub header: Vec<String>,
    /// Rows, one field per column.
    pub rows: Vec<Vec<String>>,
}

impl FrontCsv {
    /// Parses a front CSV; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or("");
        let Some(rest) = first.strip_prefix("# ").and_then(|r| r.strip_prefix(FRONT_FORMAT)) else {
            return Err(Error::parse(origin, format!("line 1: expected `# {FRONT_FORMAT} version {FRONT_VERSION}`: not a mixq front CSV")));
        };
        let version = rest.trim().strip_prefix("version ").and_then(|v| v.trim().parse::<u64>().ok());
        match version {
            Some(FRONT_VERSION) => {}
            Some(got) => return Err(Error::Version { path: origin.into(), what: FRONT_FORMAT.into(), got, expected: FRONT_VERSION }),
            None => return Err(Error::parse(origin, format!("line 1: expected `# {FRONT_FORMAT} version {FRONT_VERSION}`"))),
        }
        let header: Vec<String> = lines.next().unwrap_or("").split(',').map(str::to_string).collect();
        let mut rows = Vec::new();
        for (i, l) in lines.enumerate() {
            let row: Vec<String> = l.split(',').map(str::to_string).collect();
            if row.len() != header.len() {
                return Err(Error::parse(origin, format!("line {}: {} fields, the header has {}", i + 3, row.len(), header.len())));
            }
            rows.push(row);
        }
        Ok(FrontCsv { header, rows })
    }

    /// Reads a front CSV file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// The numbers of column `name`.
    pub fn column(&self, name: &str) -> Result<Vec<f64>> {
        let origin = || format!("front CSV column `{name}`");
        let i = self
            .header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| Error::invalid("column", name, format!("no such column; the CSV has {}", self.header.join(", "))))?;
        self.rows
            .iter()
            .enumerate()
            .map(|(r, row)| row[i].parse::<f64>().map_err(|_| Error::invalid(origin(), &row[i], format!("row {r}: not a number"))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_through_the_reader() {
        let table = crate::cost::synthetic(3, 6, 4);
        let front = pareto_front(&table, None, &Constraints::default(), Resource::Size, Sampling::Points(5), SolverKind::Auto).unwrap();
        assert_eq!(front.points.len(), 5);
        let csv = FrontCsv::parse(&front.to_csv(), Path::new("f.csv")).unwrap();
        assert_eq!(csv.rows.len(), 5);
        let objective = csv.column("objective").unwrap();
        for (o, p) in objective.iter().zip(&front.points) {
            assert_eq!(*o, p.alloc.objective);
        }
        // More budget never gives a worse objective.
        assert!(objective.windows(2).all(|w| w[1] <= w[0]), "{objective:?}");
        let bad = front.to_csv().replacen("version 1", "version 9", 1);
        let err = FrontCsv::parse(&bad, Path::new("f.csv")).unwrap_err().to_string();
        assert!(err.contains("f.csv") && err.contains("version 9"), "{err}");
        let err = FrontCsv::parse("point,fraction\n0,0\n", Path::new("g.csv")).unwrap_err().to_string();
        assert!(err.contains("g.csv") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn fewer_than_two_points_are_refused() {
        let table = crate::cost::synthetic(3, 6, 4);
        let err = pareto_front(&table, None, &Constraints::default(), Resource::Size, Sampling::Points(1), SolverKind::Auto).unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
    }
}
