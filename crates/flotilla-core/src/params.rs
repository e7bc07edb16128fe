//! Parameters as data: an ordered collection of named f32 tensors.
//!
//! Names and layouts follow PyTorch's `state_dict` (`conv1.weight` is `[out, in, kh, kw]`,
//! `fc1.weight` is `[out, in]`), so a collection written as safetensors loads into the
//! equivalent PyTorch module unchanged.

use crate::CoreError;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One named tensor: a shape and its values in row-major order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    /// Dotted PyTorch-style name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values in row-major order; `data.len()` equals the product of `shape`.
    pub data: Vec<f32>,
}

impl Tensor {
    /// Builds a tensor, checking that the data fits the shape.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Result<Self, CoreError> {
        let name = name.into();
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(CoreError::ShapeMismatch {
                name,
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { name, shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(name: impl Into<String>, shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            name: name.into(),
            shape,
            data: vec![0.0; n],
        }
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// True when every value is finite.
    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }
}

/// An ordered collection of named tensors. Order is part of the value: it is the canonical
/// order used by codecs, aggregation and files.
///
/// Tensors are shared between clones until one is written (copy on write), so the tasks of a
/// round that all send the global model hold one copy of it, however many clients there are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamSet {
    tensors: Vec<Arc<Tensor>>,
}

impl ParamSet {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a collection, rejecting duplicate names.
    pub fn from_tensors(tensors: Vec<Tensor>) -> Result<Self, CoreError> {
        let mut set = Self::new();
        for t in tensors {
            set.push(t)?;
        }
        Ok(set)
    }

    /// Appends a tensor; a duplicate name is an error.
    pub fn push(&mut self, tensor: Tensor) -> Result<(), CoreError> {
        if self.position(&tensor.name).is_some() {
            return Err(CoreError::Incompatible(format!(
                "tensor `{}` appears twice",
                tensor.name
            )));
        }
        self.tensors.push(Arc::new(tensor));
        Ok(())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the collection holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of values over all tensors.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.numel()).sum()
    }

    /// Tensors in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = &Tensor> {
        self.tensors.iter().map(|t| &**t)
    }

    /// Mutable tensors in canonical order.
    /// Each tensor shared with another collection is copied first.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        self.tensors.iter_mut().map(Arc::make_mut)
    }

    /// The tensors, consuming the collection (copying those shared with another).
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors.into_iter().map(Arc::unwrap_or_clone).collect()
    }

    /// Names in canonical order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.position(name).map(|i| &*self.tensors[i])
    }

    /// The tensor with this name, mutable (copied first if shared with another collection).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.position(name)
            .map(move |i| Arc::make_mut(&mut self.tensors[i]))
    }

    /// The tensor with this name, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor, CoreError> {
        self.get(name)
            .ok_or_else(|| CoreError::Missing(name.to_string()))
    }

    /// The sub-collection of tensors whose name satisfies `keep`, in canonical order.
    pub fn filter(&self, keep: impl Fn(&str) -> bool) -> ParamSet {
        ParamSet {
            tensors: self
                .tensors
                .iter()
                .filter(|t| keep(&t.name))
                .cloned()
                .collect(),
        }
    }

    /// Overwrites the tensors of `self` with those of `part` that have the same name.
    /// Every tensor of `part` must exist in `self` with the same shape.
    pub fn overwrite_with(&mut self, part: &ParamSet) -> Result<(), CoreError> {
        for t in part.iter() {
            let own = self.get_mut(&t.name).ok_or_else(|| {
                CoreError::Incompatible(format!("tensor `{}` is not part of the model", t.name))
            })?;
            if own.shape != t.shape {
                return Err(CoreError::Incompatible(format!(
                    "tensor `{}` has shape {:?}, expected {:?}",
                    t.name, t.shape, own.shape
                )));
            }
            own.data.copy_from_slice(&t.data);
        }
        Ok(())
    }

    /// Checks that `other` has exactly the same names, order and shapes.
    pub fn check_same_layout(&self, other: &ParamSet) -> Result<(), CoreError> {
        if self.len() != other.len() {
            return Err(CoreError::Incompatible(format!(
                "{} tensors vs {} tensors",
                self.len(),
                other.len()
            )));
        }
        for (a, b) in self.iter().zip(other.iter()) {
            if a.name != b.name || a.shape != b.shape {
                return Err(CoreError::Incompatible(format!(
                    "`{}` {:?} vs `{}` {:?}",
                    a.name, a.shape, b.name, b.shape
                )));
            }
        }
        Ok(())
    }

    /// The first tensor holding NaN or infinity, as an error.
    pub fn check_finite(&self) -> Result<(), CoreError> {
        match self.tensors.iter().find(|t| !t.is_finite()) {
            Some(t) => Err(CoreError::NonFinite(t.name.clone())),
            None => Ok(()),
        }
    }

    /// Largest absolute difference between two collections of the same layout.
    pub fn max_abs_diff(&self, other: &ParamSet) -> Result<f32, CoreError> {
        self.check_same_layout(other)?;
        Ok(self
            .iter()
            .zip(other.iter())
            .flat_map(|(a, b)| a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()))
            .fold(0.0, f32::max))
    }

    /// Raw f32 size in bytes (4 per value), the reference for wire overhead.
    pub fn raw_bytes(&self) -> usize {
        self.numel() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: Vec<usize>, v: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(name, shape, vec![v; n]).unwrap()
    }

    #[test]
    fn clones_share_tensors_until_one_is_written() {
        let a = ParamSet::from_tensors(vec![t("w", vec![4], 1.0), t("b", vec![2], 2.0)]).unwrap();
        let mut b = a.clone();
        let ptr = |p: &ParamSet, n: &str| p.get(n).unwrap().data.as_ptr();
        // A round's tasks clone the global model: one copy of the values between them.
        assert_eq!(ptr(&a, "w"), ptr(&b, "w"));
        assert_eq!(ptr(&a.filter(|n| n == "w"), "w"), ptr(&a, "w"));
        // Writing one tensor copies that tensor only, and leaves the original as it was.
        b.get_mut("w").unwrap().data[0] = 9.0;
        assert_ne!(ptr(&a, "w"), ptr(&b, "w"));
        assert_eq!(ptr(&a, "b"), ptr(&b, "b"));
        assert_eq!(a.get("w").unwrap().data, vec![1.0; 4]);
        assert_eq!(b.get("w").unwrap().data[0], 9.0);
        for t in b.iter_mut() {
            t.data[1] = -1.0;
        }
        assert_eq!(a.get("b").unwrap().data, vec![2.0; 2]);
        assert_eq!(a.clone().into_tensors()[0].data, vec![1.0; 4]);
    }

    #[test]
    fn shape_must_match_data() {
        assert!(Tensor::new("a", vec![2, 3], vec![0.0; 5]).is_err());
        assert!(Tensor::new("a", vec![2, 3], vec![0.0; 6]).is_ok());
    }

    #[test]
    fn duplicates_rejected_and_order_kept() {
        let mut p = ParamSet::new();
        p.push(t("b", vec![1], 1.0)).unwrap();
        p.push(t("a", vec![2], 2.0)).unwrap();
        assert!(p.push(t("a", vec![2], 2.0)).is_err());
        assert_eq!(p.names().collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(p.numel(), 3);
    }

    #[test]
    fn overwrite_checks_names_and_shapes() {
        let mut p =
            ParamSet::from_tensors(vec![t("a", vec![2], 0.0), t("b", vec![3], 0.0)]).unwrap();
        let part = ParamSet::from_tensors(vec![t("b", vec![3], 5.0)]).unwrap();
        p.overwrite_with(&part).unwrap();
        assert_eq!(p.get("b").unwrap().data, vec![5.0; 3]);
        assert_eq!(p.get("a").unwrap().data, vec![0.0; 2]);
        let bad = ParamSet::from_tensors(vec![t("b", vec![4], 5.0)]).unwrap();
        assert!(p.overwrite_with(&bad).is_err());
        let unknown = ParamSet::from_tensors(vec![t("c", vec![1], 5.0)]).unwrap();
        assert!(p.overwrite_with(&unknown).is_err());
    }

    #[test]
    fn finiteness() {
        let mut p = ParamSet::from_tensors(vec![t("a", vec![2], 0.0)]).unwrap();
        assert!(p.check_finite().is_ok());
        p.get_mut("a").unwrap().data[1] = f32::NAN;
        assert!(matches!(p.check_finite(), Err(CoreError::NonFinite(n)) if n == "a"));
    }
}
