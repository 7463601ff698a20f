//! Client libraries on the pool host: [`publisher`] writes batches straight into granted log
//! space, [`subscriber`] reads a topic in total order straight
//! from the pool.

pub mod publisher;
pub mod subscriber;
