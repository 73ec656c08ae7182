//! What one rank of a multi-device run carries into loading and the forward pass: its place
//! in the layout and the communicators of its TP and EP groups.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::parallel::comm::Communicator;
use crate::parallel::layout::RankLayout;

/// One rank's layout and group communicators (`None` where the group is this rank alone).
pub struct RankContext<B: Backend> {
    pub layout: RankLayout,
    /// The ranks that split attention heads and the vocabulary with this one.
    pub tp: Option<Arc<dyn Communicator<B>>>,
    /// The ranks that split the routed experts with this one.
    pub ep: Option<Arc<dyn Communicator<B>>>,
}

impl<B: Backend> Clone for RankContext<B> {
    fn clone(&self) -> Self {
        RankContext { layout: self.layout, tp: self.tp.clone(), ep: self.ep.clone() }
    }
}

impl<B: Backend> RankContext<B> {
    /// A single-device run.
    pub fn single() -> Self {
        RankContext { layout: RankLayout::SINGLE, tp: None, ep: None }
    }

    /// Collective over `world` (every rank calls it): splits the world communicator into this
    /// rank's TP and EP groups.
    pub fn new(layout: RankLayout, world: &dyn Communicator<B>) -> Result<Self> {
        let l = layout.layout;
        if world.size() != l.world || world.rank() != layout.rank {
            return Err(Error::Comm {
                rank: world.rank(),
                size: world.size(),
                msg: format!("the layout expects rank {} of {}", layout.rank, l.world),
            });
        }
        let tp = if l.tp > 1 { Some(Arc::from(world.split(layout.tp_group())?)) } else { None };
        let ep = if l.ep > 1 { Some(Arc::from(world.split(layout.ep_group())?)) } else { None };
        Ok(RankContext { layout, tp, ep })
    }
}
