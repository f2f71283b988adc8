//! Sums of partial results in a fixed order, so that a reduction gives the same bits whatever
//! the thread count and however rayon's threads steal work.
//!
//! rayon's `fold`/`reduce` (and `sum`) add their partial results in a tree that follows the
//! splits rayon made, and those depend on which thread stole which job: two runs of the same
//! step then round differently, and training drifts apart after a few steps. Here the parts
//! are given by the caller (a function of the shapes only), each part is summed in its own
//! buffer in a fixed order, and the parts are added pairwise in a balanced binary tree fixed
//! by their count. `rayon::join` runs the two halves in parallel where threads are free; with
//! one thread the same tree is evaluated in turn.

use std::ops::AddAssign;

/// `part(i, acc)` adds part `i`'s contribution into `acc` (zeroed, `len` long) for each
/// `i < parts`; the parts' sums are added in a binary tree fixed by `parts`. Returns zeros when
/// there are no parts.
pub(crate) fn tree_sum<T, F>(parts: usize, len: usize, part: &F) -> Vec<T>
where
    T: Copy + Default + Send + AddAssign,
    F: Fn(usize, &mut [T]) + Sync,
{
    if parts == 0 {
        return vec![T::default(); len];
    }
    node(0..parts, len, part)
}

fn node<T, F>(parts: std::ops::Range<usize>, len: usize, part: &F) -> Vec<T>
where
    T: Copy + Default + Send + AddAssign,
    F: Fn(usize, &mut [T]) + Sync,
{
    if parts.len() == 1 {
        let mut acc = vec![T::default(); len];
        part(parts.start, &mut acc);
        return acc;
    }
    let mid = parts.start + parts.len() / 2;
    let (mut left, right) = rayon::join(
        || node(parts.start..mid, len, part),
        || node(mid..parts.end, len, part),
    );
    left.iter_mut().zip(&right).for_each(|(a, b)| *a += *b);
    left
}

/// `count` consecutive ranges (the last ones shorter by one at most) covering `0..items`: the
/// parts of a [`tree_sum`] over items, a function of the two numbers only.
pub(crate) fn even_parts(items: usize, count: usize) -> Vec<std::ops::Range<usize>> {
    let count = count.clamp(1, items.max(1));
    (0..count)
        .map(|i| (i * items / count)..((i + 1) * items / count))
        .filter(|r| !r.is_empty())
        .collect()
}

thread_local! {
    /// Scratch buffers of this thread, reused across the parts it runs.
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch buffer of this thread (its length and content are whatever the last
/// user left), so that the parts of a [`tree_sum`] do not each allocate (and fault in) their
/// large patch matrices. Safe when `f` itself waits on rayon and this thread runs another part
/// meanwhile: that part takes another buffer.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    let mut buffer = SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    let result = f(&mut buffer);
    SCRATCH.with(|s| s.borrow_mut().push(buffer));
    result
}

/// How many parts a reduction over the batch is cut into: enough for the threads of large
/// machines, fixed so that the result does not depend on how many there are.
pub(crate) const PARTS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose float sum depends on the order they are added in.
    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 + if i % 3 == 0 { 1e4 } else { 0.0 })
            .collect()
    }

    fn sum_in_pool(threads: usize, xs: &[f32], parts: usize) -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let ranges = even_parts(xs.len(), parts);
        pool.install(|| {
            tree_sum(ranges.len(), 2, &|i, acc: &mut [f32]| {
                for &v in &xs[ranges[i].clone()] {
                    acc[0] += v;
                    acc[1] += v * 0.5;
                }
            })
        })
    }

    #[test]
    fn the_same_bits_on_any_thread_count() {
        let xs = values(10_007);
        let one = sum_in_pool(1, &xs, 13);
        for threads in [2, 3, 8] {
            for _ in 0..20 {
                let many = sum_in_pool(threads, &xs, 13);
                assert_eq!(
                    one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    many.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{threads} threads"
                );
            }
        }
        let exact: f64 = xs.iter().map(|&v| v as f64).sum();
        assert!((one[0] as f64 - exact).abs() / exact < 1e-5);
    }

    #[test]
    fn even_parts_cover_the_items_once() {
        for (items, count) in [(0, 4), (1, 4), (5, 16), (64, 16), (100, 7)] {
            let parts = even_parts(items, count);
            let covered: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(covered, (0..items).collect::<Vec<_>>());
            assert!(parts.len() <= count.max(1));
        }
        assert_eq!(
            tree_sum::<f32, _>(0, 3, &|_, _| unreachable!()),
            vec![0.0; 3]
        );
    }
}
