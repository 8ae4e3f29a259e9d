//! `meshca plan`: the rotation timeline an operator needs, as text and as an SVG picture. Both
//! are drawn from the status document, so they show exactly what `meshca status` knows.
//!
//! Rows: every anchor in the bundle (and archived ones still valid), every issuer, and the
//! window of a leaf signed now. Marks: today, and the moment each gate of the current phase
//! opens (now, when measured open; else its time fallback); in steady, the rotation deadline
//! (stage by then to finish by the time gates before the anchor expires) and when the activate
//! and finish gates would open by time if you staged now. It answers "when can I safely
//! finish?" and "when must I start?" at a glance.

use std::fmt::Write as _;
use std::path::PathBuf;

use rotator::anchors::OpenedBy;
use rotator::state::{AnchorStatus, IssuerStatus, Phase};
use rotator::status::Status;
use time::OffsetDateTime;

use crate::status::StatusArgs;
use crate::{Failed, Output};

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    status: StatusArgs,
    /// Also write the picture as SVG to this file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Active,
    Staged,
    Retiring,
    Archived,
    Prepared,
    Retired,
    Leaf,
}

impl Kind {
    fn of_anchor(status: AnchorStatus) -> Self {
        match status {
            AnchorStatus::Active => Self::Active,
            AnchorStatus::Staged => Self::Staged,
            AnchorStatus::Retiring => Self::Retiring,
            AnchorStatus::Archived => Self::Archived,
        }
    }

    fn of_issuer(status: IssuerStatus) -> Self {
        match status {
            IssuerStatus::Active => Self::Active,
            IssuerStatus::Prepared => Self::Prepared,
            IssuerStatus::Retired => Self::Retired,
        }
    }

    fn color(self) -> &'static str {
        match self {
            Self::Active => "#2e7d32",
            Self::Staged => "#1565c0",
            Self::Retiring => "#ef6c00",
            Self::Archived | Self::Retired => "#9e9e9e",
            Self::Prepared => "#64b5f6",
            Self::Leaf => "#8e24aa",
        }
    }

    fn glyph(self) -> char {
        match self {
            Self::Active => '=',
            Self::Staged | Self::Prepared => '+',
            Self::Retiring => '~',
            Self::Archived | Self::Retired => '.',
            Self::Leaf => '#',
        }
    }
}

#[derive(Debug)]
struct Row {
    label: String,
    from: OffsetDateTime,
    to: OffsetDateTime,
    kind: Kind,
}

#[derive(Debug)]
struct Mark {
    at: OffsetDateTime,
    label: String,
    open: bool,
    /// Said after a mark still ahead that is not open: ` ◀ not before this` for a gate, ` ◀ not
    /// after this` for a deadline, nothing for what would happen if you staged now.
    note: &'static str,
}

const GATE: &str = " ◀ not before this";

#[derive(Debug)]
struct Timeline {
    start: OffsetDateTime,
    end: OffsetDateTime,
    now: OffsetDateTime,
    title: String,
    rows: Vec<Row>,
    marks: Vec<Mark>,
}

fn timeline(doc: &Status) -> Timeline {
    let now = doc.now;
    let leaf_max =
        time::Duration::seconds(i64::try_from(doc.policy.leaf_ttl_max_seconds).unwrap_or(0));
    let mut rows = Vec::new();
    for a in &doc.anchors {
        if a.status == AnchorStatus::Archived && a.not_after < now {
            continue;
        }
        rows.push(Row {
            label: format!("anchor {} ({})", a.id, a.status),
            from: a.not_before,
            to: a.not_after,
            kind: Kind::of_anchor(a.status),
        });
    }
    for i in &doc.issuers {
        rows.push(Row {
            label: format!("issuer {} ({}, under {})", i.id, i.status, i.anchor),
            from: i.not_before,
            to: i.not_after,
            kind: Kind::of_issuer(i.status),
        });
    }
    rows.push(Row {
        label: "a leaf signed now (max TTL)".into(),
        from: now,
        to: now + leaf_max,
        kind: Kind::Leaf,
    });
    let mut marks = Vec::new();
    let phase = &doc.anchor_rotation.phase;
    if let Phase::Staged { since, .. } | Phase::Activated { since, .. } = &doc.phase {
        marks.push(Mark {
            at: *since,
            label: format!("{phase} since"),
            open: true,
            note: "",
        });
    }
    for g in doc.anchor_rotation.gates.iter().map(|g| &g.gate) {
        let step = g.step.name();
        if g.opened_by == Some(OpenedBy::Always) {
            continue;
        }
        if g.open {
            marks.push(Mark {
                at: now,
                label: format!(
                    "{step}: open now ({})",
                    match g.opened_by {
                        Some(OpenedBy::Measured) => "measured",
                        Some(OpenedBy::Time) => "time",
                        Some(OpenedBy::Always) | None => "",
                    }
                ),
                open: true,
                note: "",
            });
        } else if let Some(at) = g.opens_at {
            marks.push(Mark {
                at,
                label: format!("{step} gate opens (time fallback)"),
                open: false,
                note: GATE,
            });
        }
    }
    if matches!(doc.phase, Phase::Steady) {
        marks.extend(steady_marks(doc));
    }
    // The window: from a leaf TTL before the first mark (or now) to a leaf TTL after the last
    // mark, so the gates and the leaf window are what the picture is about.
    let first = marks.iter().map(|m| m.at).min().unwrap_or(now).min(now);
    let last = marks
        .iter()
        .map(|m| m.at)
        .max()
        .unwrap_or(now)
        .max(now + leaf_max);
    let margin = leaf_max.max(time::Duration::minutes(1));
    let (start, end) = (first - margin, last + margin);
    let title = format!(
        "meshca {} — phase {phase}, bundle v{} — {}",
        doc.trust_domain,
        doc.bundle_version,
        rotator::clock::rfc3339(now)
    );
    Timeline {
        start,
        end,
        now,
        title,
        rows,
        marks,
    }
}

/// In steady: the next rotation's deadline (the last moment to stage and still finish by the
/// time gates before the anchor expires) and, if you staged now, when the activate and finish
/// gates would open by time at the latest (sooner when measured).
fn steady_marks(doc: &Status) -> Vec<Mark> {
    let secs = |s: u64| time::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 2));
    let p = &doc.policy;
    let leaf_max = secs(p.leaf_ttl_max_seconds);
    let activate = doc.now + leaf_max + secs(p.propagation_allowance_seconds);
    let finish = activate + leaf_max + secs(p.clock_skew_seconds);
    let mut marks = vec![
        Mark {
            at: activate,
            label: "if staged now: activate gate opens by time at the latest".into(),
            open: false,
            note: "",
        },
        Mark {
            at: finish,
            label: "if staged now: finish gate opens by time at the latest".into(),
            open: false,
            note: "",
        },
    ];
    if let Some(d) = &doc.rotation_deadlines.anchor {
        marks.push(Mark {
            at: d.at,
            label: format!(
                "rotation deadline: stage by then to finish by the time gates before anchor {} expires",
                d.id
            ),
            open: false,
            note: " ◀ not after this",
        });
    }
    marks
}

fn frac(tl: &Timeline, at: OffsetDateTime) -> f64 {
    let span = (tl.end - tl.start).as_seconds_f64();
    ((at - tl.start).as_seconds_f64() / span).clamp(0.0, 1.0)
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "column numbers within the width"
)]
fn col(tl: &Timeline, at: OffsetDateTime, width: usize) -> usize {
    ((frac(tl, at) * (width as f64 - 1.0)).round() as usize).min(width - 1)
}

fn date(t: OffsetDateTime) -> String {
    let r = rotator::clock::rfc3339(t);
    r.get(..16).unwrap_or(&r).replace('T', " ")
}

fn text(tl: &Timeline) -> String {
    const W: usize = 60;
    let lw = tl
        .rows
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(20)
        .max(36);
    let mut o = String::new();
    let _ = writeln!(o, "{}", tl.title);
    let _ = writeln!(
        o,
        "{:<lw$} |{}|",
        format!("{} … {}", date(tl.start), date(tl.end)),
        " ".repeat(W),
    );
    let now_col = col(tl, tl.now, W);
    for r in &tl.rows {
        let (a, b) = (col(tl, r.from, W), col(tl, r.to, W));
        let mut line: Vec<char> = vec![' '; W];
        for c in line.iter_mut().take(b + 1).skip(a) {
            *c = r.kind.glyph();
        }
        if line[now_col] == ' ' {
            line[now_col] = '|';
        }
        let until = if r.to > tl.end {
            format!("→ {}", date(r.to))
        } else {
            format!("until {}", date(r.to))
        };
        let _ = writeln!(
            o,
            "{:<lw$} |{}| {until}",
            r.label,
            line.into_iter().collect::<String>()
        );
    }
    let mut marks: Vec<&Mark> = tl.marks.iter().collect();
    marks.sort_by_key(|m| m.at);
    let _ = writeln!(o, "\nWHEN");
    let _ = writeln!(o, "  {}  now", date(tl.now));
    for m in marks {
        let _ = writeln!(
            o,
            "  {}  {}{}",
            date(m.at),
            m.label,
            if m.open || m.at <= tl.now { "" } else { m.note }
        );
    }
    let _ = writeln!(
        o,
        "\nlegend: = active  + staged/prepared  ~ retiring  . retired/archived  # leaf window  | now"
    );
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The picture's geometry: where the bars go.
struct Canvas<'a> {
    tl: &'a Timeline,
    left: f64,
    width: f64,
    row_h: f64,
}

impl Canvas<'_> {
    fn x(&self, at: OffsetDateTime) -> f64 {
        self.left + frac(self.tl, at) * self.width
    }
}

fn svg(tl: &Timeline) -> String {
    let c = Canvas {
        tl,
        left: 330.0,
        width: 760.0,
        row_h: 26.0,
    };
    let (left, width) = (c.left, c.width);
    #[allow(clippy::cast_precision_loss, reason = "a handful of rows")]
    let rows_h = tl.rows.len() as f64 * c.row_h;
    #[allow(clippy::cast_precision_loss, reason = "a handful of marks")]
    let height = 70.0 + rows_h + 30.0 + tl.marks.len() as f64 * 18.0 + 40.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = left + width + 20.0
    );
    let _ = writeln!(o, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        o,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(&tl.title)
    );
    let _ = writeln!(
        o,
        r##"<text x="{left}" y="44" fill="#555">{}</text><text x="{}" y="44" fill="#555" text-anchor="end">{}</text>"##,
        date(tl.start),
        left + width,
        date(tl.end)
    );
    svg_rows(&c, &mut o);
    let bottom = 56.0 + rows_h;
    svg_day_ticks(&c, bottom, &mut o);
    svg_marks(&c, bottom, &mut o);
    svg_legend(height, &mut o);
    o.push_str("</svg>\n");
    o
}

/// One bar per certificate (and the leaf window), labelled.
fn svg_rows(c: &Canvas<'_>, o: &mut String) {
    for (i, r) in c.tl.rows.iter().enumerate() {
        #[allow(clippy::cast_precision_loss, reason = "a handful of rows")]
        let y = 56.0 + i as f64 * c.row_h;
        let (a, b) = (c.x(r.from), c.x(r.to).max(c.x(r.from) + 2.0));
        let _ = writeln!(
            o,
            r#"<text x="10" y="{}">{}</text><rect x="{a:.1}" y="{y}" width="{:.1}" height="{}" rx="3" fill="{}"/>"#,
            y + 14.0,
            esc(&r.label),
            b - a,
            c.row_h - 8.0,
            r.kind.color()
        );
        if r.to > c.tl.end {
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{}" text-anchor="end" fill="white">→ {}</text>"#,
                c.left + c.width - 4.0,
                y + 13.0,
                date(r.to)
            );
        }
    }
}

/// Day ticks (midnight UTC) when the window spans a month or less.
fn svg_day_ticks(c: &Canvas<'_>, bottom: f64, o: &mut String) {
    if c.tl.end - c.tl.start <= time::Duration::days(31) {
        let mut d = c.tl.start.replace_time(time::Time::MIDNIGHT) + time::Duration::days(1);
        while d < c.tl.end {
            let dx = c.x(d);
            let _ = writeln!(
                o,
                r##"<line x1="{dx:.1}" y1="50" x2="{dx:.1}" y2="{bottom}" stroke="#e0e0e0"/><text x="{dx:.1}" y="{}" fill="#999" font-size="10" text-anchor="middle">{}</text>"##,
                bottom + 26.0,
                &rotator::clock::rfc3339(d)[5..10]
            );
            d += time::Duration::days(1);
        }
    }
}

/// The now line and each mark's dashed line with its date and label.
fn svg_marks(c: &Canvas<'_>, bottom: f64, o: &mut String) {
    let nx = c.x(c.tl.now);
    let _ = writeln!(
        o,
        r##"<line x1="{nx:.1}" y1="48" x2="{nx:.1}" y2="{bottom}" stroke="#d32f2f" stroke-width="2"/><text x="{nx:.1}" y="{}" fill="#d32f2f" text-anchor="middle">now</text>"##,
        bottom + 14.0
    );
    let mut marks: Vec<&Mark> = c.tl.marks.iter().collect();
    marks.sort_by_key(|m| m.at);
    for (i, m) in marks.iter().enumerate() {
        let mx = c.x(m.at);
        let color = if m.open { "#2e7d32" } else { "#000000" };
        #[allow(clippy::cast_precision_loss, reason = "a handful of marks")]
        let ty = bottom + 34.0 + i as f64 * 18.0;
        // Labels right of their line, or left of it in the right half of the picture.
        let (tx, anchor) = if mx > c.left + c.width * 0.55 {
            (mx - 3.0, "end")
        } else {
            (mx + 3.0, "start")
        };
        let _ = writeln!(
            o,
            r#"<line x1="{mx:.1}" y1="48" x2="{mx:.1}" y2="{ty}" stroke="{color}" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{ty}" fill="{color}" text-anchor="{anchor}">{} — {}</text>"#,
            date(m.at),
            esc(&m.label)
        );
    }
}

/// What the colours mean.
fn svg_legend(height: f64, o: &mut String) {
    let ly = height - 14.0;
    let mut lx = 10.0;
    for (k, name) in [
        (Kind::Active, "active"),
        (Kind::Staged, "staged"),
        (Kind::Prepared, "prepared"),
        (Kind::Retiring, "retiring"),
        (Kind::Retired, "retired/archived"),
        (Kind::Leaf, "leaf window"),
    ] {
        let _ = writeln!(
            o,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{ly}">{name}</text>"#,
            ly - 10.0,
            k.color(),
            lx + 16.0
        );
        lx += 120.0;
    }
}

/// Runs `meshca plan`.
pub fn plan(a: PlanArgs, output: Output) -> Result<(), Failed> {
    let doc = crate::status::document(&a.status, output)?;
    let tl = timeline(&doc);
    if let Some(path) = &a.svg {
        rotator::store::write_atomic(path, svg(&tl).as_bytes(), 0o644)?;
    }
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "now": rotator::clock::rfc3339(tl.now),
                "rows": tl.rows.iter().map(|r| serde_json::json!({
                    "label": r.label, "from": rotator::clock::rfc3339(r.from), "to": rotator::clock::rfc3339(r.to),
                })).collect::<Vec<_>>(),
                "marks": tl.marks.iter().map(|m| serde_json::json!({
                    "at": rotator::clock::rfc3339(m.at), "label": m.label, "open": m.open,
                })).collect::<Vec<_>>(),
                "svg": a.svg,
            })
        ),
        Output::Text => {
            print!("{}", text(&tl));
            if let Some(p) = &a.svg {
                println!("\nwrote {}", p.display());
            }
        }
    }
    Ok(())
}
