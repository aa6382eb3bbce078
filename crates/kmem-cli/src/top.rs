//! `kmem top`: a live, slabtop-like view of a machine while a workload runs.
//!
//! The view has slabtop's summary, kmem's memory figures, every populated zone's free blocks
//! and fragmentation index per order, and the caches with slabtop's columns (OBJS ACTIVE USE
//! OBJ SIZE SLABS OBJ/SLAB CACHE SIZE NAME), sorted by slabtop's keys. Each refresh runs
//! `--steps-per-frame` workload steps, then draws. `q` quits; a sort key re-sorts at once.
//!
//! On a terminal it is drawn with ratatui; with `--once`, or when standard output is not a
//! terminal, it prints plain text frames in `slabtop -o`'s exact format followed by the zones
//! (so scripts and pipes get text, not escape codes).

use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;
use kmem::addr::{NR_PAGE_ORDERS, PAGE_SIZE};
use kmem_hosted::Machine;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::Paragraph;

use crate::sampler::{CacheStat, Snapshot, Workload};

/// A slabtop sort key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// `a`: active objects.
    ActiveObjs,
    /// `b`: objects per slab.
    ObjsPerSlab,
    /// `c`: cache size.
    CacheSize,
    /// `l`: slabs.
    Slabs,
    /// `v`: active slabs (every slab of kmem's `/proc/slabinfo` is active: as `l`).
    ActiveSlabs,
    /// `n`: name (ascending; every other key sorts descending).
    Name,
    /// `o`: objects (the default).
    Objects,
    /// `p`: pages per slab.
    PagesPerSlab,
    /// `s`: object size.
    ObjSize,
    /// `u`: utilization.
    Use,
}

/// The keys, their letters and what they sort by.
const SORT_KEYS: [(char, SortKey, &str); 10] = [
    ('a', SortKey::ActiveObjs, "active objects"),
    ('b', SortKey::ObjsPerSlab, "objects per slab"),
    ('c', SortKey::CacheSize, "cache size"),
    ('l', SortKey::Slabs, "slabs"),
    ('v', SortKey::ActiveSlabs, "active slabs"),
    ('n', SortKey::Name, "name"),
    ('o', SortKey::Objects, "objects"),
    ('p', SortKey::PagesPerSlab, "pages per slab"),
    ('s', SortKey::ObjSize, "object size"),
    ('u', SortKey::Use, "utilization"),
];

impl SortKey {
    /// The key of slabtop's letter (either case).
    pub fn from_char(c: char) -> Option<SortKey> {
        let c = c.to_ascii_lowercase();
        SORT_KEYS.iter().find(|k| k.0 == c).map(|k| k.1)
    }

    /// slabtop's letter.
    pub fn letter(self) -> char {
        SORT_KEYS.iter().find(|k| k.1 == self).map_or('o', |k| k.0)
    }

    /// What it sorts by, for people.
    pub fn label(self) -> &'static str {
        SORT_KEYS.iter().find(|k| k.1 == self).map_or("", |k| k.2)
    }

    /// Sorts `caches` as slabtop does: names ascending, every number descending; equal keys
    /// keep their `/proc/slabinfo` order (a stable sort).
    pub fn sort(self, caches: &mut [CacheStat]) {
        let num = |c: &CacheStat| -> u64 {
            match self {
                SortKey::ActiveObjs => c.active_objs as u64,
                SortKey::ObjsPerSlab => c.objs_per_slab as u64,
                SortKey::CacheSize => c.cache_size(),
                SortKey::Slabs | SortKey::ActiveSlabs => c.slabs as u64,
                SortKey::Objects => c.num_objs as u64,
                SortKey::PagesPerSlab => c.pages_per_slab as u64,
                SortKey::ObjSize => c.obj_size as u64,
                SortKey::Use => u64::from(c.use_percent()),
                SortKey::Name => 0,
            }
        };
        if self == SortKey::Name {
            caches.sort_by(|a, b| a.name.cmp(&b.name));
        } else {
            caches.sort_by_key(|c| std::cmp::Reverse(num(c)));
        }
    }
}

/// Parses `--sort`: one of slabtop's letters.
pub fn parse_sort(s: &str) -> Result<SortKey, String> {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => SortKey::from_char(c),
        _ => None,
    }
    .ok_or_else(|| {
        let keys: Vec<String> = SORT_KEYS
            .iter()
            .map(|(c, _, what)| format!("{c} ({what})"))
            .collect();
        format!("unknown sort key '{s}': use one of {}", keys.join(", "))
    })
}

/// Parses `--delay`: seconds, fractions allowed, 0 to 3600.
pub fn parse_delay(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(d) if (0.0..=3600.0).contains(&d) => Ok(d),
        Ok(_) => Err(format!("delay '{s}' is out of range (0 to 3600 seconds)")),
        Err(_) => Err(format!("'{s}' is not a delay in seconds (e.g. 1, 0.5)")),
    }
}

/// `kmem top`'s options.
#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// Sort by one of slabtop's keys: a (active objects), b (objects per slab), c (cache
    /// size), l (slabs), v (active slabs), n (name), o (objects), p (pages per slab),
    /// s (object size), u (utilization).
    #[arg(short, long, default_value = "o", value_parser = parse_sort)]
    pub sort: SortKey,
    /// Seconds between refreshes (fractions allowed; 0: as fast as the workload runs).
    #[arg(short, long, default_value = "1", value_parser = parse_delay, allow_negative_numbers = true)]
    pub delay: f64,
    /// Print one plain-text frame and exit, as `slabtop -o`.
    #[arg(short, long)]
    pub once: bool,
    /// Exit after N refreshes (plain text prints N frames).
    #[arg(short = 'n', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,
    /// Workload steps run before each refresh.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub steps_per_frame: u64,
}

/// slabtop's summary figures over a snapshot's caches (`procps` computes them this way).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Active and total objects.
    pub objs: (u64, u64),
    /// Active and total slabs.
    pub slabs: (u64, u64),
    /// Caches with objects, and all caches.
    pub caches: (u64, u64),
    /// Bytes of active objects and of all objects.
    pub size: (u64, u64),
    /// Smallest, average (bytes of all objects over their number) and largest object size.
    pub obj_size: (u64, u64, u64),
}

impl Summary {
    /// The figures of `caches`.
    pub fn of(caches: &[CacheStat]) -> Summary {
        let mut s = Summary::default();
        let mut min = u64::MAX;
        for c in caches {
            let (a, n, size) = (c.active_objs as u64, c.num_objs as u64, c.obj_size as u64);
            s.objs.0 += a;
            s.objs.1 += n;
            s.slabs.0 += c.slabs as u64;
            s.slabs.1 += c.slabs as u64;
            s.caches.0 += u64::from(n > 0);
            s.caches.1 += 1;
            s.size.0 += a * size;
            s.size.1 += n * size;
            min = min.min(size);
            s.obj_size.2 = s.obj_size.2.max(size);
        }
        s.obj_size.0 = if caches.is_empty() { 0 } else { min };
        s.obj_size.1 = s.size.1.checked_div(s.objs.1).unwrap_or(0);
        s
    }

    /// slabtop's five summary lines (each ends with a newline; a blank line follows).
    pub fn lines(&self) -> Vec<String> {
        let pct = |a: u64, b: u64| {
            if b == 0 {
                0.0
            } else {
                100.0 * a as f64 / b as f64
            }
        };
        let k = |b: u64| b as f64 / 1024.0;
        vec![
            format!(
                " {:<35}: {} / {} ({:.1}%)",
                "Active / Total Objects (% used)",
                self.objs.0,
                self.objs.1,
                pct(self.objs.0, self.objs.1)
            ),
            format!(
                " {:<35}: {} / {} ({:.1}%)",
                "Active / Total Slabs (% used)",
                self.slabs.0,
                self.slabs.1,
                pct(self.slabs.0, self.slabs.1)
            ),
            format!(
                " {:<35}: {} / {} ({:.1}%)",
                "Active / Total Caches (% used)",
                self.caches.0,
                self.caches.1,
                pct(self.caches.0, self.caches.1)
            ),
            format!(
                " {:<35}: {:.2}K / {:.2}K ({:.1}%)",
                "Active / Total Size (% used)",
                k(self.size.0),
                k(self.size.1),
                pct(self.size.0, self.size.1)
            ),
            format!(
                " {:<35}: {:.2}K / {:.2}K / {:.2}K",
                "Minimum / Average / Maximum Object",
                k(self.obj_size.0),
                k(self.obj_size.1),
                k(self.obj_size.2)
            ),
        ]
    }
}

/// slabtop's column headings (78 columns, as slabtop pads them).
pub const HEADINGS: &str = "  OBJS ACTIVE  USE OBJ SIZE  SLABS OBJ/SLAB CACHE SIZE NAME";

/// One cache as a slabtop row (`%6u %6u %3u%% %7.2fK %6u %8u %9luK %-23s`).
pub fn cache_row(c: &CacheStat) -> String {
    format!(
        "{:6} {:6} {:3}% {:7.2}K {:6} {:8} {:9}K {:<23}",
        c.num_objs,
        c.active_objs,
        c.use_percent(),
        c.obj_size as f64 / 1024.0,
        c.slabs,
        c.objs_per_slab,
        c.cache_size() / 1024,
        c.name
    )
}

/// A size in pages as kB, MB or GB for people.
fn human(pages: usize) -> String {
    let kb = (pages * PAGE_SIZE / 1024) as f64;
    if kb >= 10.0 * 1024.0 * 1024.0 {
        format!("{:.1}G", kb / 1024.0 / 1024.0)
    } else if kb >= 10.0 * 1024.0 {
        format!("{:.1}M", kb / 1024.0)
    } else {
        format!("{kb:.0}K")
    }
}

/// The memory line under the summary.
fn memory_line(s: &Snapshot) -> String {
    format!(
        " MemTotal {}  MemFree {}  MemAvailable {}  Slab {} (SReclaimable {}, SUnreclaim {})  page allocation failures {}",
        human(s.mem_total),
        human(s.mem_free),
        human(s.mem_available),
        human(s.slab_pages()),
        human(s.slab_reclaimable),
        human(s.slab_unreclaimable),
        s.alloc_failures
    )
}

/// The zone lines: free blocks per order (as `/proc/buddyinfo`) and the fragmentation index
/// per order (as `extfrag_index`, divided by 1000), with a heading.
fn zone_lines(s: &Snapshot) -> Vec<String> {
    let mut head = format!("{:<24}", " ZONE      FREE  order");
    for o in 0..NR_PAGE_ORDERS {
        let _ = write!(head, " {o:>6}");
    }
    let mut lines = vec![head];
    for z in &s.zones {
        let mut free = format!(" {:<8} {:>8}  blocks", z.name, human(z.free_pages));
        for n in z.free_blocks {
            let _ = write!(free, " {n:>6}");
        }
        let mut frag = format!("{:<24}", "                   extfrag");
        for i in z.extfrag() {
            let _ = write!(frag, " {:>6.3}", f64::from(i) / 1000.0);
        }
        lines.push(free);
        lines.push(frag);
    }
    lines
}

/// The caches of `s`, sorted by `sort`.
fn sorted(s: &Snapshot, sort: SortKey) -> Vec<CacheStat> {
    let mut caches = s.caches.clone();
    sort.sort(&mut caches);
    caches
}

/// One plain-text frame: `slabtop -o`'s output (summary, headings, every cache), then a
/// blank line, the memory line, the zones and the workload's state.
pub fn plain_frame(s: &Snapshot, sort: SortKey, workload: &str) -> String {
    let caches = sorted(s, sort);
    let mut out = String::new();
    for l in Summary::of(&caches).lines() {
        out.push_str(&l);
        out.push('\n');
    }
    out.push('\n');
    let _ = writeln!(out, "{HEADINGS:<78}");
    for c in &caches {
        out.push_str(&cache_row(c));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&memory_line(s));
    out.push('\n');
    for l in zone_lines(s) {
        out.push_str(&l);
        out.push('\n');
    }
    let _ = writeln!(out, " workload: {workload}; sorted by {}", sort.label());
    out
}

/// What one frame of the live view shows.
pub struct View<'a> {
    /// The state to show.
    pub snap: &'a Snapshot,
    /// The sort key.
    pub sort: SortKey,
    /// The workload's description.
    pub workload: &'a str,
    /// The workload is over.
    pub done: bool,
}

/// Draws the live view into `frame`.
pub fn render(frame: &mut Frame<'_>, v: &View<'_>) {
    let caches = sorted(v.snap, v.sort);
    let zones = zone_lines(v.snap);
    let [top, zone_area, cache_area, footer] = Layout::vertical([
        Constraint::Length(7),
        Constraint::Length(zones.len() as u16 + 1),
        Constraint::Min(2),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let mut head: Vec<Line> = Summary::of(&caches)
        .lines()
        .into_iter()
        .map(Line::from)
        .collect();
    head.push(Line::from(""));
    head.push(Line::from(memory_line(v.snap)));
    frame.render_widget(Paragraph::new(head), top);

    let reversed = Style::default().add_modifier(Modifier::REVERSED);
    let zone_text: Vec<Line> = zones
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                Line::styled(l, reversed)
            } else {
                Line::from(l)
            }
        })
        .collect();
    frame.render_widget(Paragraph::new(zone_text), zone_area);

    let rows = (cache_area.height as usize).saturating_sub(1);
    let width = cache_area.width as usize;
    let mut cache_text = vec![Line::styled(format!("{HEADINGS:<width$}"), reversed)];
    cache_text.extend(caches.iter().take(rows).map(|c| Line::from(cache_row(c))));
    frame.render_widget(Paragraph::new(cache_text), cache_area);

    let state = if v.done { "workload done" } else { "running" };
    let status = format!(
        " kmem top: {} ({state}) | sort: {} ({}) | q quit, a b c l v n o p s u sort",
        v.workload,
        v.sort.letter(),
        v.sort.label()
    );
    frame.render_widget(Paragraph::new(Line::styled(status, reversed)), footer);
}

/// Runs `kmem top` on `m` with `workload`, writing plain frames to `out` when it is not a
/// terminal (or with `--once`). Gives everything back (`Workload::finish`) at the end.
pub fn run(
    m: &Machine,
    workload: &mut dyn Workload,
    args: &TopArgs,
    out: &mut impl Write,
    out_is_terminal: bool,
) -> Result<(), String> {
    let result = if args.once || !out_is_terminal {
        run_plain(m, workload, args, out)
    } else {
        run_live(m, workload, args)
    };
    let finished = workload.finish(m);
    result.and(finished)
}

/// Runs `steps` workload steps; returns how many ran and whether the workload is over.
fn advance(m: &Machine, workload: &mut dyn Workload, steps: u64) -> (u64, bool) {
    for i in 0..steps {
        if !workload.step(m) {
            return (i, true);
        }
    }
    (steps, false)
}

fn run_plain(
    m: &Machine,
    workload: &mut dyn Workload,
    args: &TopArgs,
    out: &mut impl Write,
) -> Result<(), String> {
    let frames = if args.once {
        1
    } else {
        args.iterations.unwrap_or(1)
    };
    let mut steps = 0;
    for i in 0..frames {
        steps += advance(m, workload, args.steps_per_frame).0;
        let snap = Snapshot::take(m, steps);
        if i > 0 {
            out.write_all(b"\n").map_err(|e| e.to_string())?;
        }
        out.write_all(plain_frame(&snap, args.sort, &workload.describe()).as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("writing the output: {e}"))?;
        if i + 1 < frames {
            std::thread::sleep(Duration::from_secs_f64(args.delay));
        }
    }
    Ok(())
}

/// Puts the terminal back however the live view ends.
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

fn run_live(m: &Machine, workload: &mut dyn Workload, args: &TopArgs) -> Result<(), String> {
    let mut terminal =
        ratatui::try_init().map_err(|e| format!("cannot take over the terminal: {e}"))?;
    let _restore = RestoreTerminal;
    let io = |e: std::io::Error| format!("terminal: {e}");
    let mut sort = args.sort;
    let mut steps = 0;
    let mut frames = 0;
    let delay = Duration::from_secs_f64(args.delay);
    loop {
        let (ran, over) = advance(m, workload, args.steps_per_frame);
        steps += ran;
        let done = over;
        let snap = Snapshot::take(m, steps);
        let describe = workload.describe();
        let draw = |t: &mut ratatui::DefaultTerminal, sort| {
            t.draw(|f| {
                render(
                    f,
                    &View {
                        snap: &snap,
                        sort,
                        workload: &describe,
                        done,
                    },
                )
            })
            .map(|_| ())
        };
        draw(&mut terminal, sort).map_err(io)?;
        frames += 1;
        if args.iterations.is_some_and(|n| frames >= n) {
            return Ok(());
        }
        let deadline = Instant::now() + delay;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && !done {
                break;
            }
            // Once the workload is over, only keys matter; still refresh every second.
            let wait = if done {
                left.max(Duration::from_millis(50))
                    .min(Duration::from_secs(1))
            } else {
                left
            };
            if !event::poll(wait).map_err(io)? {
                if done && Instant::now() >= deadline {
                    break;
                }
                continue;
            }
            match event::read().map_err(io)? {
                Event::Key(k) if k.kind == KeyEventKind::Press => match k.code {
                    KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(());
                    }
                    KeyCode::Char(c) => {
                        if let Some(s) = SortKey::from_char(c) {
                            sort = s;
                            draw(&mut terminal, sort).map_err(io)?;
                        }
                    }
                    _ => {}
                },
                Event::Resize(..) => draw(&mut terminal, sort).map_err(io)?,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{CHURN_CACHE, Churn, ChurnConfig, ZoneStat};
    use kmem_hosted::MachineConfig;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn cache(name: &str, active: usize, num: usize, size: usize, per: usize) -> CacheStat {
        CacheStat {
            name: name.into(),
            active_objs: active,
            num_objs: num,
            obj_size: size,
            objs_per_slab: per,
            pages_per_slab: (size * per).div_ceil(PAGE_SIZE),
            slabs: num.div_ceil(per),
            reclaimable: false,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            step: 3,
            caches: vec![
                cache("kmalloc-64", 100, 128, 64, 64),
                cache("dentry", 900, 1008, 192, 21),
                cache("inode_cache", 10, 40, 600, 13),
                cache("buffer_head", 0, 0, 104, 39),
            ],
            zones: vec![ZoneStat {
                name: "Normal",
                managed: 4096,
                free_pages: 1000,
                free_blocks: [8, 4, 2, 1, 0, 0, 0, 0, 0, 0, 0],
            }],
            mem_total: 4096,
            mem_free: 1000,
            mem_available: 1100,
            slab_reclaimable: 20,
            slab_unreclaimable: 30,
            alloc_failures: 2,
        }
    }

    fn screen(snap: &Snapshot, sort: SortKey) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
        t.draw(|f| {
            render(
                f,
                &View {
                    snap,
                    sort,
                    workload: "test",
                    done: false,
                },
            )
        })
        .unwrap();
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    /// Rows of the screen naming one of `names`, in screen order.
    fn order(lines: &[String], names: &[&str]) -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| {
                let last = l.split_whitespace().last()?;
                names.contains(&last).then(|| last.to_string())
            })
            .collect()
    }

    #[test]
    fn screen_shows_the_caches_in_the_chosen_order() {
        let s = snapshot();
        let names = ["kmalloc-64", "dentry", "inode_cache", "buffer_head"];
        let lines = screen(&s, SortKey::Name);
        assert!(lines.iter().any(|l| l.contains(HEADINGS)), "{lines:#?}");
        assert!(lines[0].contains("Active / Total Objects (% used)    : 1010 / 1176 (85.9%)"));
        assert_eq!(
            order(&lines, &names),
            ["buffer_head", "dentry", "inode_cache", "kmalloc-64"]
        );
        // Objects: 1008, 128, 40, 0.
        assert_eq!(
            order(&screen(&s, SortKey::Objects), &names),
            ["dentry", "kmalloc-64", "inode_cache", "buffer_head"]
        );
        // Use: 89%, 78%, 25%, 0%.
        assert_eq!(
            order(&screen(&s, SortKey::Use), &names),
            ["dentry", "kmalloc-64", "inode_cache", "buffer_head"]
        );
        // Object size: 600, 192, 104, 64.
        assert_eq!(
            order(&screen(&s, SortKey::ObjSize), &names),
            ["inode_cache", "dentry", "buffer_head", "kmalloc-64"]
        );
        // Objects per slab: 64, 39, 21, 13.
        assert_eq!(
            order(&screen(&s, SortKey::ObjsPerSlab), &names),
            ["kmalloc-64", "buffer_head", "dentry", "inode_cache"]
        );
        let row = lines.iter().find(|l| l.ends_with_name("dentry")).unwrap();
        assert!(
            row.starts_with("  1008    900  89%    0.19K     48       21       192K dentry"),
            "{row:?}"
        );
        // The zone lines and the status line.
        assert!(
            lines
                .iter()
                .any(|l| l.contains("Normal") && l.contains("blocks      8      4      2      1"))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("extfrag") && l.contains("-1.000"))
        );
        assert!(lines.last().unwrap().contains("sort: n (name)"));
    }

    trait EndsWithName {
        fn ends_with_name(&self, name: &str) -> bool;
    }

    impl EndsWithName for String {
        fn ends_with_name(&self, name: &str) -> bool {
            self.split_whitespace().last() == Some(name)
        }
    }

    #[test]
    fn sort_keys_are_slabtops() {
        for (c, k) in [
            ('a', SortKey::ActiveObjs),
            ('b', SortKey::ObjsPerSlab),
            ('c', SortKey::CacheSize),
            ('l', SortKey::Slabs),
            ('v', SortKey::ActiveSlabs),
            ('n', SortKey::Name),
            ('o', SortKey::Objects),
            ('p', SortKey::PagesPerSlab),
            ('s', SortKey::ObjSize),
            ('u', SortKey::Use),
        ] {
            assert_eq!(parse_sort(&c.to_string()), Ok(k));
            assert_eq!(SortKey::from_char(c.to_ascii_uppercase()), Some(k));
            assert_eq!(k.letter(), c);
        }
        for bad in ["x", "", "oo", "objects"] {
            let e = parse_sort(bad).unwrap_err();
            assert!(
                e.contains("unknown sort key") && e.contains("u (utilization)"),
                "{e}"
            );
        }
        assert_eq!(parse_delay("0.25"), Ok(0.25));
        assert!(parse_delay("-1").is_err() && parse_delay("soon").is_err());
        assert!(parse_delay("NaN").is_err() && parse_delay("1e9").is_err());
    }

    #[test]
    fn sorting_a_machines_caches() {
        let m = Machine::boot(MachineConfig::x86_64(64 << 20)).unwrap();
        let mut churn = Churn::new(&m, ChurnConfig::default()).unwrap();
        for _ in 0..15 {
            churn.step(&m);
        }
        let s = Snapshot::take(&m, 15);
        let lines = screen(&s, SortKey::CacheSize);
        let sizes: Vec<u64> = lines
            .iter()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 8 && f[2].ends_with('%'))
                    .then(|| f[6].trim_end_matches('K').parse().ok())?
            })
            .collect();
        assert!(sizes.len() > 5, "{lines:#?}");
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
        assert!(lines.iter().any(|l| l.contains(CHURN_CACHE)));
        churn.finish(&m).unwrap();
    }

    /// Runs `slabtop -o -s c` over `slabinfo` bind-mounted on `/proc/slabinfo` in a private
    /// user and mount namespace; `None` (after saying why) where that cannot be done.
    fn real_slabtop(slabinfo: &str) -> Option<String> {
        use std::process::Command;
        for tool in ["unshare", "slabtop"] {
            if Command::new(tool).arg("--version").output().is_err() {
                eprintln!("SKIPPED plain_frame_matches_slabtop: `{tool}` is not installed");
                return None;
            }
        }
        let path = std::env::temp_dir().join(format!("kmem-top-slabinfo-{}", std::process::id()));
        std::fs::write(&path, slabinfo).unwrap();
        let sh = format!(
            "mount --bind '{}' /proc/slabinfo && slabtop -o -s c",
            path.display()
        );
        let out = Command::new("unshare")
            .args(["-rm", "sh", "-c", &sh])
            .output();
        let _ = std::fs::remove_file(&path);
        match out {
            Ok(o) if o.status.success() => Some(String::from_utf8(o.stdout).unwrap()),
            other => {
                eprintln!(
                    "SKIPPED plain_frame_matches_slabtop: unshare -rm and a bind mount over /proc are not allowed here: {other:?}"
                );
                None
            }
        }
    }

    #[test]
    fn plain_frame_matches_slabtop_on_the_same_state() {
        let m = Machine::boot(MachineConfig::x86_64(64 << 20)).unwrap();
        let mut churn = Churn::new(&m, ChurnConfig::default()).unwrap();
        for _ in 0..25 {
            churn.step(&m);
        }
        let snap = Snapshot::take(&m, 25);
        let slabinfo = m.proc_slabinfo();
        churn.finish(&m).unwrap();
        let ours = plain_frame(&snap, SortKey::CacheSize, "test");
        let Some(theirs) = real_slabtop(&slabinfo) else {
            return;
        };
        let ours: Vec<&str> = ours.lines().collect();
        let theirs: Vec<&str> = theirs.lines().collect();
        // The summary, the blank line and the headings, character for character.
        assert_eq!(&ours[..7], &theirs[..7]);
        // The same rows (equal cache sizes may come in another order: procps uses qsort).
        let mut a: Vec<&str> = ours[7..]
            .iter()
            .take_while(|l| !l.is_empty())
            .copied()
            .collect();
        let mut b: Vec<&str> = theirs[7..].to_vec();
        assert_eq!(a.len(), b.len());
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }

    #[test]
    fn plain_frame_is_slabtop_once() {
        let s = snapshot();
        let text = plain_frame(&s, SortKey::CacheSize, "test");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            " Active / Total Objects (% used)    : 1010 / 1176 (85.9%)"
        );
        assert_eq!(
            lines[1],
            " Active / Total Slabs (% used)      : 54 / 54 (100.0%)"
        );
        assert_eq!(
            lines[2],
            " Active / Total Caches (% used)     : 3 / 4 (75.0%)"
        );
        // Active: 100*64 + 900*192 + 10*600 = 185200 B; total: 8192 + 193536 + 24000.
        assert_eq!(
            lines[3],
            " Active / Total Size (% used)       : 180.86K / 220.44K (82.0%)"
        );
        // Average: 225728 / 1176 = 191 B.
        assert_eq!(
            lines[4],
            " Minimum / Average / Maximum Object : 0.06K / 0.19K / 0.59K"
        );
        assert_eq!(lines[5], "");
        assert_eq!(lines[6].len(), 78);
        assert_eq!(lines[6].trim_end(), HEADINGS);
        assert_eq!(
            lines[7],
            "  1008    900  89%    0.19K     48       21       192K dentry                 "
        );
        assert!(lines[8].ends_with("32K inode_cache            "));
        assert!(lines[9].ends_with(" 8K kmalloc-64             "));
        assert!(lines[10].ends_with(" 0K buffer_head            "));
        assert!(text.contains("page allocation failures 2"));
    }
}
