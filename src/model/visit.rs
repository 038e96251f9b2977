//! A walk over a model's hookable modules, so tuning methods can find layers by their
//! diffusers path and attach extensions without the model code naming any method.
use super::attention::Attention;
use super::layers::{Conv2d, Linear};
use super::transformer::BasicTransformerBlock;

pub enum ModuleMut<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
    Attention(&'a mut Attention),
    TransformerBlock(&'a mut BasicTransformerBlock),
}

impl ModuleMut<'_> {
    pub fn path(&self) -> &str {
        match self {
            ModuleMut::Linear(m) => &m.path,
            ModuleMut::Conv2d(m) => &m.path,
            ModuleMut::Attention(m) => &m.path,
            ModuleMut::TransformerBlock(m) => &m.path,
        }
    }
}

/// Implemented by every model part that contains hookable modules; visits containers before
/// their contents.
pub trait VisitModules {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>));
}

impl VisitModules for Linear {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        f(ModuleMut::Linear(self))
    }
}

impl VisitModules for Conv2d {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        f(ModuleMut::Conv2d(self))
    }
}

impl<T: VisitModules> VisitModules for Option<T> {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        if let Some(m) = self {
            m.visit_modules(f)
        }
    }
}

impl<T: VisitModules> VisitModules for Vec<T> {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        for m in self {
            m.visit_modules(f)
        }
    }
}

impl VisitModules for Attention {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        f(ModuleMut::Attention(self));
        for lin in [
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
        ] {
            lin.visit_modules(f);
        }
    }
}

impl VisitModules for BasicTransformerBlock {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        f(ModuleMut::TransformerBlock(self));
        self.attn1.visit_modules(f);
        self.attn2.visit_modules(f);
        self.ff.proj_in.visit_modules(f);
        self.ff.proj_out.visit_modules(f);
    }
}

impl VisitModules for super::transformer::Transformer2DModel {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        use super::transformer::Projection;
        let visit_projection = |p: &mut Projection, f: &mut dyn FnMut(ModuleMut<'_>)| match p {
            Projection::Conv(c) => c.visit_modules(f),
            Projection::Linear(l) => l.visit_modules(f),
        };
        visit_projection(&mut self.proj_in, f);
        self.transformer_blocks.visit_modules(f);
        visit_projection(&mut self.proj_out, f);
    }
}

impl VisitModules for super::resnet::ResnetBlock2D {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        self.conv1.visit_modules(f);
        self.time_emb_proj.visit_modules(f);
        self.conv2.visit_modules(f);
        self.conv_shortcut.visit_modules(f);
    }
}

impl VisitModules for super::resnet::Downsample2D {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        self.conv.visit_modules(f)
    }
}

impl VisitModules for super::resnet::Upsample2D {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        self.conv.visit_modules(f)
    }
}
