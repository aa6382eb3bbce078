//! `kmem plot`: charts of a workload's run.
//!
//! The workload runs to its end with a [`Snapshot`] after every step; then three charts are
//! drawn with plotters, each as PNG, SVG or both:
//!
//! * `free-blocks`: free blocks per order over time, one panel per populated zone (the
//!   numbers of `/proc/buddyinfo`);
//! * `slab-memory`: `Slab`, `SReclaimable` and `SUnreclaim` of `/proc/meminfo` over time;
//! * `extfrag`: the kernel's fragmentation index per order over time, one panel per zone
//!   (`extfrag_index`: -1 when a block of the order is free, towards 1 when the order fails
//!   because memory is fragmented, towards 0 when it fails for lack of memory).
//!
//! PNGs are drawn into an RGB buffer and encoded with the `png` crate; text is drawn with
//! DejaVu Sans, embedded in the binary, so no system font or font library is needed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::{Args, ValueEnum};
use kmem::addr::{NR_PAGE_ORDERS, PAGE_SIZE};
use kmem_hosted::Machine;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::sampler::{Snapshot, Workload};

/// Image formats `kmem plot` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// PNG images.
    Png,
    /// SVG images.
    Svg,
    /// Both.
    Both,
}

/// `kmem plot`'s options.
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// Directory to write the charts into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Image format.
    #[arg(long, value_enum, default_value_t = Format::Png)]
    pub format: Format,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u32).range(320..=8192))]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 800, value_parser = clap::value_parser!(u32).range(240..=8192))]
    pub height: u32,
}

/// The charts, by file stem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chart {
    /// Free blocks per order over time, per zone.
    FreeBlocks,
    /// Slab memory over time.
    SlabMemory,
    /// Fragmentation index per order over time, per zone.
    Extfrag,
}

impl Chart {
    /// Every chart.
    pub const ALL: [Chart; 3] = [Chart::FreeBlocks, Chart::SlabMemory, Chart::Extfrag];

    /// The file name without extension.
    pub fn stem(self) -> &'static str {
        match self {
            Chart::FreeBlocks => "free-blocks",
            Chart::SlabMemory => "slab-memory",
            Chart::Extfrag => "extfrag",
        }
    }
}

/// Makes DejaVu Sans plotters' "sans-serif" font (once).
fn register_font() -> Result<(), String> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the embedded font could not be loaded".into())
    }
}

/// The colour of order `o`'s line.
fn order_color(o: usize) -> RGBColor {
    let (r, g, b) = HSLColor(o as f64 / NR_PAGE_ORDERS as f64 * 0.85, 0.75, 0.42).rgb();
    RGBColor(r, g, b)
}

type DrawResult = Result<(), String>;

fn err(e: impl std::fmt::Display) -> String {
    format!("drawing: {e}")
}

/// One panel: a line per series over `xs`, with a legend.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    xs: &[u64],
    series: &[(String, RGBColor, Vec<f64>)],
    y_range: Option<(f64, f64)>,
    y_decimals: usize,
) -> DrawResult {
    let x_max = xs.last().copied().unwrap_or(0).max(1);
    let (y_min, y_max) = y_range.unwrap_or_else(|| {
        let max = series
            .iter()
            .flat_map(|s| s.2.iter().copied())
            .fold(0.0f64, f64::max);
        (0.0, (max * 1.08).max(1.0))
    });
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0u64..x_max, y_min..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("workload step")
        .y_desc(y_label)
        // Whole-number axes (block counts) get no more ticks than whole numbers in range, so
        // no two ticks round to the same label.
        .y_labels(if y_decimals == 0 {
            ((y_max - y_min).ceil() as usize + 1).clamp(2, 10)
        } else {
            10
        })
        .y_label_formatter(&|v: &f64| {
            // No "-0.0" from rounding.
            let v = if v.abs() < 1e-9 { 0.0 } else { *v };
            format!("{v:.y_decimals$}")
        })
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for (name, color, ys) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                xs.iter().copied().zip(ys.iter().copied()),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// Draws `chart` of `snaps` on `root`.
pub fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart: Chart,
    snaps: &[Snapshot],
) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let xs: Vec<u64> = snaps.iter().map(|s| s.step).collect();
    let zones: Vec<&'static str> = snaps
        .first()
        .map(|s| s.zones.iter().map(|z| z.name).collect())
        .unwrap_or_default();
    match chart {
        Chart::SlabMemory => {
            let mib = |pages: usize| (pages * PAGE_SIZE) as f64 / (1 << 20) as f64;
            let series = vec![
                (
                    "Slab".to_string(),
                    RGBColor(40, 40, 40),
                    snaps.iter().map(|s| mib(s.slab_pages())).collect(),
                ),
                (
                    "SReclaimable".to_string(),
                    RGBColor(30, 120, 200),
                    snaps.iter().map(|s| mib(s.slab_reclaimable)).collect(),
                ),
                (
                    "SUnreclaim".to_string(),
                    RGBColor(210, 80, 40),
                    snaps.iter().map(|s| mib(s.slab_unreclaimable)).collect(),
                ),
            ];
            panel(
                &root,
                "Slab memory (/proc/meminfo)",
                "MiB",
                &xs,
                &series,
                None,
                1,
            )?;
        }
        Chart::FreeBlocks | Chart::Extfrag => {
            let panels = root.split_evenly((zones.len().max(1), 1));
            for (zi, (area, zone)) in panels.iter().zip(&zones).enumerate() {
                let series: Vec<(String, RGBColor, Vec<f64>)> = (0..NR_PAGE_ORDERS)
                    .map(|o| {
                        let ys = snaps
                            .iter()
                            .map(|s| {
                                let z = &s.zones[zi];
                                if chart == Chart::FreeBlocks {
                                    z.free_blocks[o] as f64
                                } else {
                                    f64::from(z.extfrag()[o]) / 1000.0
                                }
                            })
                            .collect();
                        (format!("order {o}"), order_color(o), ys)
                    })
                    .collect();
                if chart == Chart::FreeBlocks {
                    let title = format!("{zone}: free blocks per order (/proc/buddyinfo)");
                    panel(area, &title, "free blocks", &xs, &series, None, 0)?;
                } else {
                    let title = format!("{zone}: fragmentation index per order (extfrag_index)");
                    panel(area, &title, "index", &xs, &series, Some((-1.1, 1.1)), 1)?;
                }
            }
        }
    }
    root.present().map_err(err)
}

/// Writes `chart` of `snaps` as a PNG of `width` × `height` pixels to `path`.
pub fn write_png(
    path: &Path,
    chart: Chart,
    snaps: &[Snapshot],
    width: u32,
    height: u32,
) -> DrawResult {
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        draw(root, chart, snaps)?;
    }
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    w.write_image_data(&buf)
        .and_then(|()| w.finish())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `chart` of `snaps` as an SVG of `width` × `height` pixels to `path`.
pub fn write_svg(
    path: &Path,
    chart: Chart,
    snaps: &[Snapshot],
    width: u32,
    height: u32,
) -> DrawResult {
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (width, height)).into_drawing_area();
        draw(root, chart, snaps)?;
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Fewest points per line kept from a long run (see [`record`]).
pub const MAX_POINTS: usize = 2000;

/// Runs `workload` to its end on `m` and returns its snapshots: the state before the first
/// step, then every `every` steps and after the last. `every` starts at 1 and doubles (every
/// other snapshot dropped) whenever 2 × [`MAX_POINTS`] are kept, so a run of any length
/// keeps between [`MAX_POINTS`] and twice that, evenly spaced (more than a chart's width in
/// pixels). The caches are not charted and not kept.
pub fn record(m: &Machine, workload: &mut dyn Workload) -> Vec<Snapshot> {
    let mut every = 1u64;
    let take = |step| {
        let mut s = Snapshot::take(m, step);
        s.caches = Vec::new();
        s
    };
    let mut snaps = vec![take(0)];
    let mut steps = 0;
    while workload.step(m) {
        steps += 1;
        if steps % every == 0 {
            snaps.push(take(steps));
            if snaps.len() >= 2 * MAX_POINTS {
                every *= 2;
                snaps.retain(|s| s.step % every == 0);
            }
        }
    }
    if snaps.last().is_some_and(|s| s.step != steps) {
        snaps.push(take(steps));
    }
    snaps
}

/// Runs `workload` to its end on `m`, then writes the charts into `args.out` and lists the
/// files on `out`. Gives everything back (`Workload::finish`) at the end.
pub fn run(
    m: &Machine,
    workload: &mut dyn Workload,
    args: &PlotArgs,
    out: &mut impl Write,
) -> Result<(), String> {
    register_font()?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let snaps = record(m, workload);
    let steps = snaps.last().map_or(0, |s| s.step);
    workload.finish(m)?;
    let mut written = Vec::new();
    for chart in Chart::ALL {
        if args.format != Format::Svg {
            let path = args.out.join(format!("{}.png", chart.stem()));
            write_png(&path, chart, &snaps, args.width, args.height)?;
            written.push(path);
        }
        if args.format != Format::Png {
            let path = args.out.join(format!("{}.svg", chart.stem()));
            write_svg(&path, chart, &snaps, args.width, args.height)?;
            written.push(path);
        }
    }
    for p in written {
        writeln!(out, "wrote {}", p.display()).map_err(|e| format!("writing the output: {e}"))?;
    }
    writeln!(out, "{} steps of {}", steps, workload.describe())
        .map_err(|e| format!("writing the output: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::ZoneStat;

    fn snaps() -> Vec<Snapshot> {
        (0..20u64)
            .map(|i| Snapshot {
                step: i,
                caches: Vec::new(),
                zones: vec![ZoneStat {
                    name: "Normal",
                    managed: 4096,
                    free_pages: 100,
                    free_blocks: std::array::from_fn(|o| (i as usize * 3 + o) % 7),
                }],
                mem_total: 4096,
                mem_free: 100,
                mem_available: 100,
                slab_reclaimable: i as usize * 10,
                slab_unreclaimable: 50,
                alloc_failures: 0,
            })
            .collect()
    }

    #[test]
    fn a_long_run_keeps_a_bounded_evenly_spaced_record() {
        let m = kmem_hosted::Machine::boot(kmem_hosted::MachineConfig::x86_64(32 << 20)).unwrap();
        let mut n = 0u64;
        let mut w = |_: &Machine| {
            n += 1;
            n <= 9_999
        };
        let snaps = record(&m, &mut w);
        assert!(
            (MAX_POINTS..2 * MAX_POINTS).contains(&snaps.len()),
            "{}",
            snaps.len()
        );
        assert_eq!(snaps[0].step, 0);
        assert_eq!(snaps.last().unwrap().step, 9_999, "the last step is kept");
        let gap = snaps[1].step;
        assert!(gap > 1);
        assert!(
            snaps[..snaps.len() - 1]
                .windows(2)
                .all(|w| w[1].step - w[0].step == gap)
        );
        let mut few = 0u64;
        let mut short = |_: &Machine| {
            few += 1;
            few <= 10
        };
        let snaps = record(&m, &mut short);
        let steps: Vec<u64> = snaps.iter().map(|s| s.step).collect();
        assert_eq!(
            steps,
            (0..=10).collect::<Vec<_>>(),
            "a short run keeps every step"
        );
    }

    #[test]
    fn charts_draw_text_with_the_embedded_font() {
        register_font().unwrap();
        // A bitmap with the title drawn has dark pixels in the caption band; without a font
        // plotters would draw no text at all.
        let (w, h) = (400u32, 300u32);
        let mut buf = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            root.fill(&WHITE).unwrap();
            root.draw_text(
                "Free blocks",
                &("sans-serif", 30).into_text_style(&root),
                (10, 10),
            )
            .unwrap();
            root.present().unwrap();
        }
        let dark = buf.chunks(3).filter(|p| p.iter().all(|&c| c < 100)).count();
        assert!(dark > 100, "{dark} dark pixels");
    }

    #[test]
    fn every_chart_draws_on_both_backends() {
        register_font().unwrap();
        let dir = std::env::temp_dir().join(format!("kmem-plot-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for chart in Chart::ALL {
            let png = dir.join(format!("{}.png", chart.stem()));
            write_png(&png, chart, &snaps(), 640, 480).unwrap();
            let bytes = std::fs::read(&png).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            let svg = dir.join(format!("{}.svg", chart.stem()));
            write_svg(&svg, chart, &snaps(), 640, 480).unwrap();
            let text = std::fs::read_to_string(&svg).unwrap();
            assert!(
                text.contains("<svg") && text.contains("order 3") || chart == Chart::SlabMemory
            );
            assert!(text.contains("workload step"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
