//! In-memory labelled image datasets.

use crate::DataError;

/// An in-memory labelled image dataset. Pixels are u8 in CHW order per image, images stored contiguously.
///
/// The fields are public for cheap access; [`Dataset::new`] checks that they
/// agree with each other. Methods never panic on an inconsistent value unless
/// their docs say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// All pixels, `len() * C * H * W` bytes, one image after another.
    pub images: Vec<u8>,
    /// One label per image, each below `num_classes`.
    pub labels: Vec<u8>,
    /// Image shape as `[channels, height, width]`.
    pub shape: [usize; 3],
    /// Number of label classes.
    pub num_classes: usize,
}

/// A train/test pair.
#[derive(Debug, Clone)]
pub struct Split {
    /// Training samples.
    pub train: Dataset,
    /// Held-out test samples.
    pub test: Dataset,
}

impl Dataset {
    /// Builds a dataset, checking that the pixel count matches the labels and
    /// that every label is below `num_classes`.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u8>,
        shape: [usize; 3],
        num_classes: usize,
    ) -> Result<Self, DataError> {
        let per = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| DataError::InvalidDataset(format!("shape {shape:?} overflows")))?;
        if labels.len().checked_mul(per) != Some(images.len()) {
            return Err(DataError::InvalidDataset(format!(
                "{} labels of shape {shape:?} need {} pixel bytes, got {}",
                labels.len(),
                labels.len().saturating_mul(per),
                images.len()
            )));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| usize::from(l) >= num_classes)
        {
            return Err(DataError::InvalidDataset(format!(
                "label {l} at index {i} is not below num_classes = {num_classes}"
            )));
        }
        Ok(Dataset {
            images,
            labels,
            shape,
            num_classes,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image, `C * H * W`.
    pub fn image_size(&self) -> usize {
        self.shape[0]
            .saturating_mul(self.shape[1])
            .saturating_mul(self.shape[2])
    }

    /// Pixels of image `i`, or `None` if `i` is out of range.
    pub fn get_image(&self, i: usize) -> Option<&[u8]> {
        let sz = self.image_size();
        if i >= self.len() {
            return None;
        }
        let start = i.checked_mul(sz)?;
        self.images.get(start..start.checked_add(sz)?)
    }

    /// Pixels of image `i` (CHW order).
    ///
    /// # Panics
    /// If `i >= self.len()`; use [`Dataset::get_image`] for a checked lookup.
    pub fn image(&self, i: usize) -> &[u8] {
        match self.get_image(i) {
            Some(img) => img,
            None => panic!(
                "image index {i} out of range for a dataset of {} samples",
                self.len()
            ),
        }
    }

    /// Copies the given samples, in the given order, into a new dataset.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        let mut images = Vec::with_capacity(indices.len().saturating_mul(self.image_size()));
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let img = self.get_image(i).ok_or(DataError::IndexOutOfRange {
                index: i,
                len: self.len(),
            })?;
            images.extend_from_slice(img);
            labels.push(self.labels[i]);
        }
        Ok(Dataset {
            images,
            labels,
            shape: self.shape,
            num_classes: self.num_classes,
        })
    }

    /// The first `min(n, len)` samples.
    pub fn take_first(&self, n: usize) -> Dataset {
        let sz = self.image_size();
        // Clamp to what the pixel buffer really holds so a hand-built,
        // inconsistent dataset cannot cause an out-of-bounds slice.
        let n = n.min(self.len()).min(self.images.len() / sz.max(1));
        Dataset {
            images: self.images[..n * sz].to_vec(),
            labels: self.labels[..n].to_vec(),
            shape: self.shape,
            num_classes: self.num_classes,
        }
    }

    /// Number of samples per class (`num_classes` bins; labels outside the range are not counted).
    pub fn label_histogram(&self) -> Vec<usize> {
        let mut h = vec![0usize; self.num_classes];
        for &l in &self.labels {
            if let Some(c) = h.get_mut(usize::from(l)) {
                *c += 1;
            }
        }
        h
    }

    /// Fill `out` (len = batch*C*H*W) with normalised f32 pixels: `(p/255 - mean[c]) / std[c]`, for the given sample indices.
    ///
    /// `mean` and `std` hold one entry per channel, or a single entry used for
    /// all channels. `out` is cleared first and its allocation reused.
    ///
    /// # Panics
    /// If an index is out of range or the normalisation parameters are
    /// invalid; [`Dataset::try_normalized_batch`] reports these as errors.
    pub fn normalized_batch(
        &self,
        indices: &[usize],
        mean: &[f32],
        std: &[f32],
        out: &mut Vec<f32>,
    ) {
        if let Err(e) = self.try_normalized_batch(indices, mean, std, out) {
            panic!("normalized_batch: {e}");
        }
    }

    /// Checked form of [`Dataset::normalized_batch`]. On error `out` is left empty.
    pub fn try_normalized_batch(
        &self,
        indices: &[usize],
        mean: &[f32],
        std: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<(), DataError> {
        out.clear();
        let channels = self.shape[0];
        let plane = self.shape[1].saturating_mul(self.shape[2]);
        let lut = build_lut(channels, mean, std)?;
        if let Some(&bad) = indices.iter().find(|&&i| self.get_image(i).is_none()) {
            return Err(DataError::IndexOutOfRange {
                index: bad,
                len: self.len(),
            });
        }
        out.reserve(indices.len().saturating_mul(self.image_size()));
        for &i in indices {
            let img = self.get_image(i).unwrap_or_default();
            // A 256-entry table per channel turns the per-pixel arithmetic into
            // a lookup and gives bit-identical results to the formula.
            for (c, pixels) in img.chunks_exact(plane.max(1)).enumerate() {
                let table = &lut[c * 256..(c + 1) * 256];
                out.extend(pixels.iter().map(|&p| table[usize::from(p)]));
            }
        }
        Ok(())
    }
}

/// Per-channel lookup tables from pixel value to normalised value.
fn build_lut(channels: usize, mean: &[f32], std: &[f32]) -> Result<Vec<f32>, DataError> {
    let pick = |v: &[f32], what: &str, c: usize| -> Result<f32, DataError> {
        match v.len() {
            1 => Ok(v[0]),
            n if n == channels => Ok(v[c]),
            n => Err(DataError::InvalidNormalization(format!(
                "{what} has {n} entries but the images have {channels} channels (give {channels} or 1)"
            ))),
        }
    };
    let mut lut = Vec::with_capacity(channels * 256);
    for c in 0..channels {
        let m = pick(mean, "mean", c)?;
        let s = pick(std, "std", c)?;
        if !m.is_finite() || !s.is_finite() || s <= 0.0 {
            return Err(DataError::InvalidNormalization(format!(
                "channel {c}: mean {m} / std {s}; mean must be finite and std finite and > 0"
            )));
        }
        lut.extend((0..=255u8).map(|p| (f32::from(p) / 255.0 - m) / s));
    }
    Ok(lut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        // 3 images of shape [2,1,2]: pixels encode (image, channel, position).
        let images = vec![0, 1, 10, 11, 100, 101, 110, 111, 200, 201, 210, 255];
        Dataset::new(images, vec![2, 0, 2], [2, 1, 2], 3).unwrap()
    }

    #[test]
    fn new_rejects_inconsistent_fields() {
        assert!(Dataset::new(vec![0; 5], vec![0, 1], [1, 1, 2], 2).is_err());
        assert!(Dataset::new(vec![0; 4], vec![0, 2], [1, 1, 2], 2).is_err());
        assert!(Dataset::new(vec![0; 4], vec![0, 1], [1, 1, 2], 2).is_ok());
    }

    #[test]
    fn accessors() {
        let d = tiny();
        assert_eq!(d.len(), 3);
        assert!(!d.is_empty());
        assert_eq!(d.image(1), &[100, 101, 110, 111]);
        assert_eq!(d.get_image(3), None);
        assert_eq!(d.label_histogram(), vec![1, 0, 2]);
        let t = d.take_first(2);
        assert_eq!(t.len(), 2);
        assert_eq!(t.images, d.images[..8].to_vec());
        assert_eq!(d.take_first(99), d);
        assert!(d.take_first(0).is_empty());
    }

    #[test]
    fn subset_copies_in_order_and_checks_range() {
        let d = tiny();
        let s = d.subset(&[2, 0]).unwrap();
        assert_eq!(s.labels, vec![2, 2]);
        assert_eq!(s.image(0), d.image(2));
        assert_eq!(s.image(1), d.image(0));
        match d.subset(&[0, 3]) {
            Err(DataError::IndexOutOfRange { index: 3, len: 3 }) => {}
            other => panic!("expected IndexOutOfRange, got {other:?}"),
        }
    }

    #[test]
    fn normalized_batch_matches_formula() {
        let d = tiny();
        let mean = [0.5f32, 0.25];
        let std = [0.5f32, 2.0];
        let mut out = vec![123.0; 7];
        d.normalized_batch(&[2, 0], &mean, &std, &mut out);
        assert_eq!(out.len(), 2 * 4);
        let expect = |p: u8, c: usize| (p as f32 / 255.0 - mean[c]) / std[c];
        let want = [
            expect(200, 0),
            expect(201, 0),
            expect(210, 1),
            expect(255, 1),
            expect(0, 0),
            expect(1, 0),
            expect(10, 1),
            expect(11, 1),
        ];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Hand-computed spot checks: 255 -> (1 - 0.25) / 2, 0 -> (0 - 0.5) / 0.5.
        assert!((out[3] - 0.375).abs() < 1e-6);
        assert!((out[4] + 1.0).abs() < 1e-6);
    }

    #[test]
    fn normalized_batch_broadcasts_single_entry() {
        let d = tiny();
        let mut a = Vec::new();
        let mut b = Vec::new();
        d.normalized_batch(&[1], &[0.3], &[0.7], &mut a);
        d.normalized_batch(&[1], &[0.3, 0.3], &[0.7, 0.7], &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn try_normalized_batch_reports_bad_input() {
        let d = tiny();
        let mut out = Vec::new();
        assert!(matches!(
            d.try_normalized_batch(&[0, 5], &[0.5], &[0.5], &mut out),
            Err(DataError::IndexOutOfRange { index: 5, .. })
        ));
        assert!(out.is_empty());
        assert!(
            d.try_normalized_batch(&[0], &[0.5, 0.5, 0.5], &[0.5], &mut out)
                .is_err()
        );
        assert!(
            d.try_normalized_batch(&[0], &[0.5], &[0.0], &mut out)
                .is_err()
        );
        assert!(
            d.try_normalized_batch(&[0], &[f32::NAN], &[1.0], &mut out)
                .is_err()
        );
    }

    #[test]
    fn inconsistent_public_fields_do_not_panic() {
        let mut d = tiny();
        d.images.truncate(5);
        assert_eq!(d.get_image(2), None);
        assert!(d.subset(&[2]).is_err());
        assert_eq!(d.take_first(3).len(), 1);
        let mut out = Vec::new();
        assert!(
            d.try_normalized_batch(&[2], &[0.5], &[0.5], &mut out)
                .is_err()
        );
    }
}
