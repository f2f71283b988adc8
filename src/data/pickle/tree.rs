//! The finished object graph of the pickle machine turned into a [`Value`] tree that keeps its
//! sharing (`Rc`), refusing values that contain themselves or nest too deep.

use std::rc::Rc;

use super::machine::{Id, Machine, Object};
use super::{MAX_DEPTH, PickleError, Value};

/// Turns the finished arena into a [`Value`] tree, each shared object built once.
pub(super) struct TreeBuilder<'m, 'a> {
    pub(super) machine: &'m Machine<'a>,
    pub(super) done: Vec<Option<Rc<Value>>>,
    pub(super) in_progress: Vec<bool>,
    /// Offset of `STOP`, for errors found here.
    pub(super) stop: usize,
}

impl TreeBuilder<'_, '_> {
    fn error<T>(&self, message: &str) -> Result<T, PickleError> {
        Err(PickleError {
            offset: self.stop,
            message: message.to_string(),
        })
    }

    pub(super) fn build(&mut self, id: Id, depth: usize) -> Result<Rc<Value>, PickleError> {
        if let Some(done) = &self.done[id] {
            return Ok(done.clone());
        }
        if self.in_progress[id] {
            return self.error("a value contains itself (recursive values are not supported)");
        }
        if depth >= MAX_DEPTH {
            return self.error(&format!("values nested more than {MAX_DEPTH} deep"));
        }
        self.in_progress[id] = true;
        let machine = self.machine;
        let items = |ids: &[Id], this: &mut Self| -> Result<Vec<Rc<Value>>, PickleError> {
            ids.iter().map(|&i| this.build(i, depth + 1)).collect()
        };
        let value = match &machine.objects[id] {
            Object::None => Value::None,
            Object::Bool(b) => Value::Bool(*b),
            Object::Int(i) => Value::Int(*i),
            Object::Float(f) => Value::Float(*f),
            Object::InputBytes(r) => Value::Bytes(machine.input[r.clone()].to_vec()),
            Object::Bytes(b) => Value::Bytes(b.clone()),
            Object::Str(s) => Value::Str(s.clone()),
            Object::List(ids) => Value::List(items(ids, self)?),
            Object::Tuple(ids) => Value::Tuple(items(ids, self)?),
            Object::Dict(pairs) => Value::Dict(
                pairs
                    .iter()
                    .map(|&(k, v)| Ok((self.build(k, depth + 1)?, self.build(v, depth + 1)?)))
                    .collect::<Result<_, PickleError>>()?,
            ),
            Object::Global { module, name } => Value::Global {
                module: module.clone(),
                name: name.clone(),
            },
            Object::Call {
                callable,
                args,
                state,
            } => Value::Object {
                callable: self.build(*callable, depth + 1)?,
                args: self.build(*args, depth + 1)?,
                state: state.map(|s| self.build(s, depth + 1)).transpose()?,
            },
        };
        let value = Rc::new(value);
        self.in_progress[id] = false;
        self.done[id] = Some(value.clone());
        Ok(value)
    }
}
