//! numpy arrays recorded in a pickle (`numpy.core.multiarray._reconstruct` and its `BUILD`).

use super::Value;

/// A numpy array recorded in a pickle, its data borrowed from the [`Value`].
#[derive(Debug, Clone, PartialEq)]
pub struct NumpyArray<'v> {
    pub shape: Vec<usize>,
    /// numpy's type string with its byte order, e.g. `|u1`, `<f4`.
    pub dtype: String,
    pub fortran_order: bool,
    pub data: &'v [u8],
}

/// Reads a numpy array out of a pickled value, checking that its data has the size its shape and
/// dtype say. Understands `numpy.core.multiarray._reconstruct` + `BUILD` (protocols 0-4, and
/// `numpy._core` of numpy 2) and `numpy.core.numeric._frombuffer` (protocol 5, in-band data).
pub fn numpy_array(value: &Value) -> Result<NumpyArray<'_>, String> {
    let Value::Object {
        callable,
        args,
        state,
    } = value
    else {
        return Err(format!("expected a numpy array, found a {}", value.kind()));
    };
    let Value::Global { module, name } = &**callable else {
        return Err("expected a numpy array, found an object that is not one".into());
    };
    let numpy_core = |sub: &str| {
        module
            .strip_prefix("numpy.core.")
            .or(module.strip_prefix("numpy._core."))
            == Some(sub)
    };
    let (shape, dtype, fortran, data) = if numpy_core("multiarray") && name == "_reconstruct" {
        let Some(state) = state else {
            return Err("numpy array without its state (no BUILD)".into());
        };
        let Value::Tuple(items) = &**state else {
            return Err("numpy array state is not a tuple".into());
        };
        match items.as_slice() {
            [_, shape, dtype, fortran, data] | [shape, dtype, fortran, data] => {
                let fortran = match **fortran {
                    Value::Bool(b) => b,
                    Value::Int(i) => i != 0,
                    _ => return Err("numpy array order flag is not a bool".into()),
                };
                (shape, dtype, fortran, data)
            }
            _ => {
                return Err(format!(
                    "numpy array state has {} fields, expected 4 or 5",
                    items.len()
                ));
            }
        }
    } else if numpy_core("numeric") && name == "_frombuffer" {
        let Value::Tuple(items) = &**args else {
            return Err("numpy _frombuffer arguments are not a tuple".into());
        };
        let [data, dtype, shape, order] = items.as_slice() else {
            return Err("numpy _frombuffer needs 4 arguments".into());
        };
        let fortran = match order.as_text() {
            Some("C") => false,
            Some("F") => true,
            _ => return Err("numpy _frombuffer order is not 'C' or 'F'".into()),
        };
        (shape, dtype, fortran, data)
    } else {
        return Err(format!(
            "expected a numpy array, found a call of {module}.{name}"
        ));
    };
    let Value::Tuple(dims) = &**shape else {
        return Err("numpy array shape is not a tuple".into());
    };
    let shape = dims
        .iter()
        .map(|d| match **d {
            Value::Int(n) => usize::try_from(n).ok(),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or("numpy array shape holds something that is not a size")?;
    let dtype = numpy_dtype(dtype)?;
    let itemsize =
        dtype_itemsize(&dtype).ok_or_else(|| format!("unsupported numpy dtype {dtype}"))?;
    let Value::Bytes(data) = &**data else {
        return Err(format!(
            "numpy array data is a {}, expected bytes",
            data.kind()
        ));
    };
    let expected = shape
        .iter()
        .try_fold(itemsize, |acc, &d| acc.checked_mul(d))
        .ok_or("numpy array shape overflows")?;
    if data.len() != expected {
        return Err(format!(
            "numpy array of shape {shape:?} and dtype {dtype} needs {expected} bytes, holds {}",
            data.len()
        ));
    }
    Ok(NumpyArray {
        shape,
        dtype,
        fortran_order: fortran,
        data,
    })
}

/// Bytes per item of a plain numeric or byte-string dtype such as `|u1`, `<f4`, `|S10`.
fn dtype_itemsize(dtype: &str) -> Option<usize> {
    let code = dtype.trim_start_matches(['|', '<', '>', '=']);
    let mut chars = code.chars();
    let kind = chars.next()?;
    let size: usize = chars.as_str().parse().ok()?;
    (matches!(kind, 'b' | 'i' | 'u' | 'f' | 'c' | 'S' | 'V') && size > 0).then_some(size)
}

/// `numpy.dtype("u1", False, True)` with its BUILD state `(3, "|", ...)` -> `"|u1"`.
fn numpy_dtype(value: &Value) -> Result<String, String> {
    let Value::Object {
        callable,
        args,
        state,
    } = value
    else {
        return Err(format!("numpy dtype is a {}", value.kind()));
    };
    if !matches!(&**callable, Value::Global { module, name } if module == "numpy" && name == "dtype")
    {
        return Err("numpy dtype is not numpy.dtype".into());
    }
    let name = match &**args {
        Value::Tuple(items) => items.first().and_then(|v| v.as_text()),
        _ => None,
    }
    .ok_or("numpy dtype without a type name")?;
    let order = match state.as_deref() {
        Some(Value::Tuple(items)) => items.get(1).and_then(|v| v.as_text()).unwrap_or("|"),
        _ => "|",
    };
    Ok(format!("{order}{name}"))
}
