//! Unit tests of the augmented AVL tree against a `BTreeMap` model (nodes from `Box`).

use std::boxed::Box;
use std::collections::BTreeMap;
use std::vec::Vec;

use super::area::VmapArea;
use super::tree::{Link, Tree};

const PAGE: usize = 4096;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn node(start: usize, end: usize) -> Link {
    Box::into_raw(Box::new(VmapArea::new(start, end)))
}

fn free_node(n: Link) {
    // SAFETY: every test node comes from `node` (Box::into_raw) and is freed once.
    drop(unsafe { Box::from_raw(n) });
}

fn drain(t: &mut Tree) {
    loop {
        let n = t.pop_first();
        if n.is_null() {
            break;
        }
        free_node(n);
    }
}

/// The lowest `(start, end)` of `model` that fits `size` at `align`, by brute force.
fn brute_fit(model: &BTreeMap<usize, usize>, size: usize, align: usize) -> Option<usize> {
    model
        .iter()
        .find(|&(&s, &e)| s.next_multiple_of(align) + size <= e)
        .map(|(&s, _)| s)
}

#[test]
fn insert_remove_find_against_model() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut t = Tree::new();
    let mut model: BTreeMap<usize, (usize, Link)> = BTreeMap::new();
    for round in 0..20_000 {
        let slot = rng.below(4096) as usize;
        let start = slot * 16 * PAGE;
        let len = (1 + rng.below(15) as usize) * PAGE;
        if let Some(&(_, n)) = model.get(&start) {
            // SAFETY: `n` is a node of `t` (the model mirrors it).
            unsafe { t.remove(n) };
            model.remove(&start);
            free_node(n);
        } else {
            let n = node(start, start + len);
            // SAFETY: a fresh node; its slot is empty in the model, so it overlaps nothing.
            unsafe { t.insert(n) };
            model.insert(start, (start + len, n));
        }
        if round % 997 == 0 {
            t.check(0, usize::MAX).unwrap();
        }
        let probe = rng.below(4096 * 16) as usize * PAGE + 5;
        let want = model
            .range(..=probe)
            .next_back()
            .filter(|&(_, &(e, _))| probe < e)
            .map(|(_, &(_, n))| n);
        let got = t.find_containing(probe);
        assert_eq!(want.unwrap_or(core::ptr::null_mut()), got);
    }
    t.check(0, usize::MAX).unwrap();
    assert_eq!(t.len(), model.len());
    // Height bound of an AVL tree: 1.44 log2(n + 2).
    let bound = (1.45 * ((t.len() + 2) as f64).log2()) as u32 + 1;
    assert!(t.height() <= bound, "height {} > {bound}", t.height());
    // In-order traversal is address order.
    let mut cursor = 0;
    for &s in model.keys() {
        let n = t.first_from(cursor);
        // SAFETY: a node of `t`.
        assert_eq!(unsafe { (*n).va_start }, s);
        cursor = s + 1;
    }
    assert!(t.first_from(cursor).is_null());
    drain(&mut t);
    assert!(t.is_empty());
}

#[test]
fn lowest_fit_matches_brute_force() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut t = Tree::new();
    let mut model: BTreeMap<usize, usize> = BTreeMap::new();
    // Disjoint free areas of random sizes with random gaps.
    let mut at = 0x1000_0000;
    for _ in 0..3000 {
        at += (1 + rng.below(8) as usize) * PAGE;
        let len = (1 + rng.below(64) as usize) * PAGE;
        let n = node(at, at + len);
        // SAFETY: fresh node, disjoint from all before it.
        unsafe { t.insert(n) };
        model.insert(at, at + len);
        at += len;
    }
    t.check(0, usize::MAX).unwrap();
    assert_eq!(t.max_size(), 64 * PAGE);
    for _ in 0..5000 {
        let size = (1 + rng.below(70) as usize) * PAGE;
        let align = PAGE << rng.below(6);
        let got = t.lowest_fit(size, align, PAGE);
        // SAFETY: null or a node of `t`.
        let found = unsafe { got.as_ref() };
        if align <= PAGE {
            // Exact lowest fit.
            let want = brute_fit(&model, size, align);
            assert_eq!(found.map(|a| a.va_start), want);
        } else if let Some(a) = found {
            // A fit, and no area below it that holds `size + align - 1`.
            assert!(a.fits(size, align));
            let big = model
                .iter()
                .find(|&(&s, &e)| e - s >= size + align - 1)
                .map(|(&s, _)| s);
            if let Some(b) = big {
                assert!(a.va_start <= b);
            }
        } else {
            assert_eq!(brute_fit(&model, size, align), None);
        }
    }
    assert!(t.lowest_fit(65 * PAGE, PAGE, PAGE).is_null());
    drain(&mut t);
}

#[test]
fn neighbours_update_and_take_list() {
    let mut t = Tree::new();
    let starts: Vec<usize> = (0..100).map(|i| 0x10_0000 + i * 4 * PAGE).collect();
    let nodes: Vec<Link> = starts.iter().map(|&s| node(s, s + 2 * PAGE)).collect();
    for &n in &nodes {
        // SAFETY: fresh, disjoint nodes.
        unsafe { t.insert(n) };
    }
    let (p, n) = t.neighbours(starts[10] + 2 * PAGE);
    assert_eq!((p, n), (nodes[10], nodes[11]));
    let (p, n) = t.neighbours(0);
    assert_eq!((p, n), (core::ptr::null_mut(), nodes[0]));
    // Grow one node in place to the right: the maximum follows after `update`.
    let n50 = nodes[50];
    // SAFETY: `n50` is a node of `t`; growing it into its free gap keeps the order.
    unsafe {
        (*n50).va_end += 2 * PAGE;
        t.update(n50);
    }
    assert_eq!(t.max_size(), 4 * PAGE);
    t.check(0, usize::MAX).unwrap();
    assert_eq!(t.last(), nodes[99]);
    let mut list = t.take_list();
    assert!(t.is_empty());
    let mut seen = 0;
    while !list.is_null() {
        assert_eq!(list, nodes[seen]);
        // SAFETY: list nodes are ours.
        let next = unsafe { (*list).left };
        free_node(list);
        list = next;
        seen += 1;
    }
    assert_eq!(seen, 100);
}
