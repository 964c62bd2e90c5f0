//! Terminal tables the subcommands print: a model's layers, metrics beside FP32, an allocation
//! with its certificate, a robust-vs-nominal comparison, a sensitivity report.

use super::table::{bytes, thousands, Table};
use crate::alloc::{Allocation, RobustComparison};
use crate::eval::{Metrics, SizeReport};
use crate::model::QuantModel;
use crate::sensitivity::SensitivityReport;

/// The quantizable layers of `model`: name, kind, shape, parameters, MACs per sample.
pub fn layers_table(model: &dyn QuantModel) -> String {
    let mut t = Table::new(&["layer", "kind", "shape", "params", "MACs/sample"], &[false, false, false, true, true]);
    for l in model.layers() {
        t.row(vec![l.name.clone(), l.kind.to_string(), format!("{:?}", l.shape), thousands(l.params), thousands(l.macs)]);
    }
    t.render("  ")
}

/// One row of [`metrics_table_for`]: the embedding columns when the metrics have them.
pub fn metrics_row(label: String, r: &Metrics, size: &SizeReport) -> Vec<String> {
    if let Some(e) = &r.embedding {
        return vec![
            label,
            format!("{:.2}", size.avg_bits),
            bytes(size.total_bytes),
            format!("{:.5}", e.mean_cosine),
            format!("{:.4}", e.min_cosine),
            format!("{:.2} %", 100.0 * e.recall_at_10),
            format!("{:.5}", e.spearman),
            format!("{:.2e}", r.loss),
        ];
    }
    vec![
        label,
        format!("{:.2}", size.avg_bits),
        bytes(size.total_bytes),
        r.accuracy.map(|a| format!("{:.2} %", 100.0 * a)).unwrap_or_else(|| "—".into()),
        format!("{:.4}", r.loss),
        format!("{:.2e}", r.kl),
        format!("{:.2} %", 100.0 * r.agreement),
    ]
}

/// The columns of a metrics table: size, accuracy, loss, KL and agreement vs FP32.
pub fn metrics_table() -> Table {
    Table::new(&["weights", "bits/w", "size", "accuracy", "loss", "KL(FP32‖Q)", "agreement"], &[false, true, true, true, true, true, true])
}

/// The metrics table of a model whose outputs are `kind`: for embedding models the mean and
/// smallest cosine to FP32, recall@10 of the FP32 neighbours, the Spearman correlation of the
/// pairwise similarities and the distillation loss instead of accuracy, KL and agreement.
pub fn metrics_table_for(kind: crate::model::OutputKind) -> Table {
    match kind {
        crate::model::OutputKind::Logits => metrics_table(),
        crate::model::OutputKind::Embedding => Table::new(
            &["weights", "bits/w", "size", "cos to FP32", "min cos", "recall@10", "Spearman", "loss"],
            &[false, true, true, true, true, true, true, true],
        ),
    }
}

/// The per-layer table and the budget lines of an allocation.
pub fn allocation(a: &Allocation) -> String {
    let mut t = Table::new(&["layer", "params", "Tr/n", "format", "bits/w", "Ω"], &[false, true, true, false, true, true]);
    for l in &a.layers {
        t.row(vec![
            l.name.clone(),
            thousands(l.params),
            l.trace_per_param.map(|x| format!("{x:.3e}")).unwrap_or_else(|| "—".into()),
            l.format.clone(),
            if l.params > 0 { format!("{:.2}", l.bits as f64 / l.params as f64) } else { "—".into() },
            format!("{:.3e}", l.cost),
        ]);
    }
    let mut s = t.render("  ");
    s.push('\n');
    for b in &a.budgets {
        s.push_str(&format!("  budget {:<16} used {} of {}\n", b.budget, b.used_display, b.limit_display));
    }
    s.push_str(&format!(
        "  objective Σ Ω = {:.6e}, lower bound {:.6e}, gap {:.2e} ({}, {:.2} ms){}\n",
        a.objective,
        a.bound,
        a.gap,
        a.solver,
        a.time_s * 1e3,
        a.note.as_ref().map(|n| format!("; {n}")).unwrap_or_default()
    ));
    s
}

/// What the robust solution changes against the nominal one: the layers whose format differs and
/// both solutions' Σ Ω under both cost tables.
pub fn robust(c: &RobustComparison) -> String {
    let n = c.nominal.layers.len();
    let mut s = format!("Robust vs nominal (costs from Tr + {}·s.e. vs Tr): {} of {n} layers change format\n", c.z, c.changed.len());
    if !c.changed.is_empty() {
        let mut t = Table::new(&["layer", "nominal", "robust"], &[false, false, false]);
        for ch in &c.changed {
            t.row(vec![ch.layer.clone(), ch.nominal.clone(), ch.robust.clone()]);
        }
        s.push_str(&t.render("  "));
    }
    let mut t = Table::new(&["Σ Ω of", "nominal costs", "robust costs"], &[false, true, true]);
    t.row(vec!["nominal config".into(), format!("{:.4e}", c.nominal.objective), format!("{:.4e}", c.nominal_under_robust)]);
    t.row(vec!["robust config".into(), format!("{:.4e}", c.robust_under_nominal), format!("{:.4e}", c.robust.objective)]);
    s.push_str(&t.render("  "));
    s
}

/// A sensitivity report's per-layer table: the columns of the estimators that ran.
pub fn sensitivity(r: &SensitivityReport) -> String {
    let has_trace = r.layers.iter().any(|l| l.trace.is_some());
    let has_fisher = r.layers.iter().any(|l| l.fisher_trace.is_some());
    let has_eig = r.layers.iter().any(|l| l.top_eigenvalue.is_some());
    let has_act = r.layers.iter().any(|l| l.activation_trace.is_some());
    let measured: Vec<String> = r.layers.first().map(|l| l.measured_delta_loss.keys().cloned().collect()).unwrap_or_default();
    let mut head: Vec<String> = vec!["layer".into(), "params".into()];
    if has_trace {
        head.extend(["trace ± 95% CI".into(), "Tr/n".into(), "probes".into(), "converged".into()]);
    }
    if has_fisher {
        head.push("Fisher tr".into());
    }
    if has_eig {
        head.push("top eig".into());
    }
    if has_act {
        head.extend(["act trace ± 95% CI".into(), "act Tr/n".into(), "act probes".into(), "act conv".into()]);
    }
    head.extend(measured.iter().map(|f| format!("ΔL {f}")));
    let right: Vec<bool> = head.iter().map(|h| h != "layer" && h != "converged" && h != "act conv").collect();
    let head_ref: Vec<&str> = head.iter().map(String::as_str).collect();
    let mut t = Table::new(&head_ref, &right);
    for l in &r.layers {
        let mut row = vec![l.name.clone(), thousands(l.params)];
        if has_trace {
            let ci = l.extra.get("trace_ci95").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            row.push(l.trace.map(|t| format!("{t:.4e} ± {ci:.1e}")).unwrap_or_else(|| "—".into()));
            row.push(l.trace_per_param().map(|t| format!("{t:.3e}")).unwrap_or_else(|| "—".into()));
            row.push(l.probes.to_string());
            row.push(if l.converged { "yes".into() } else { "NO".into() });
        }
        if has_fisher {
            row.push(l.fisher_trace.map(|t| format!("{t:.3e}")).unwrap_or_else(|| "—".into()));
        }
        if has_eig {
            row.push(l.top_eigenvalue.map(|t| format!("{t:.3e}")).unwrap_or_else(|| "—".into()));
        }
        if has_act {
            let ci = l.extra.get("activation_trace_ci95").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            row.push(l.activation_trace.map(|t| format!("{t:.4e} ± {ci:.1e}")).unwrap_or_else(|| "—".into()));
            row.push(l.activation_trace_per_element().map(|t| format!("{t:.3e}")).unwrap_or_else(|| "—".into()));
            row.push(l.activation_probes.map(|p| p.to_string()).unwrap_or_else(|| "—".into()));
            row.push(match l.activation_converged {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "—".into(),
            });
        }
        for f in &measured {
            row.push(l.measured_delta_loss.get(f).map(|v| format!("{v:.2e}")).unwrap_or_else(|| "—".into()));
        }
        t.row(row);
    }
    let mut s = format!(
        "{} on {} ({} estimators: {}, seed {})\n",
        r.model,
        r.data,
        r.settings["curvature"].as_str().unwrap_or("?"),
        r.settings["estimators"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
        r.settings["seed"]
    );
    s.push_str(&t.render("  "));
    if let Some(tt) = &r.total_trace {
        // Its own standard error, from per-probe samples of the total: the layers' samples are
        // correlated, so the per-layer errors do not add up to it.
        s.push_str(&format!(
            "total trace over the {} layers: {:.4e} ± {:.1e} (95% CI; s.e. {:.1e} from {} per-probe totals)\n",
            r.layers.len(),
            tt.trace,
            tt.ci95,
            tt.std_err,
            tt.probes
        ));
    }
    let unconverged = r.layers.iter().filter(|l| l.trace.is_some() && !l.converged).count();
    if unconverged > 0 {
        s.push_str(&format!(
            "{unconverged} layer(s) did not reach the tolerance within {} probes: raise --max-probes or --tol\n",
            r.settings["max_probes"]
        ));
    }
    let act_unconverged = r.layers.iter().filter(|l| l.activation_converged == Some(false)).count();
    if act_unconverged > 0 {
        s.push_str(&format!(
            "{act_unconverged} layer(s) did not reach the tolerance on the activation trace within {} probes: raise --max-probes or --tol\n",
            r.settings["max_probes"]
        ));
    }
    if r.layers.iter().any(|l| l.trace.is_some_and(|t| t < 0.0)) {
        s.push_str("negative traces are reported as measured; the cost model clamps them at 0 (or use --curvature ggn)\n");
    }
    s
}
