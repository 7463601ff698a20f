//! Client libraries on the pool host: [`subscriber`] reads a topic in total order straight
//! from the pool.

pub mod subscriber;
