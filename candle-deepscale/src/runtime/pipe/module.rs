//! DeepSpeed's `PipelineModule`: a model given as a list of layer *specs* (how to build each
//! layer, not the layer), so a pipeline stage builds — and reads from a checkpoint — only its own
//! layers. A [`TiedLayerSpec`] names a module shared by layers that may sit on different stages
//! (GPT-2's word embedding, used as input on the first stage and for the logits on the last):
//! every stage holding one of its layers builds its own copy, and the engine sums the copies'
//! gradients between the stages (parameters marked with `tie_group` = the spec's key).
use super::partition::{partition_items, PartitionMethod};
use crate::layers::module::{Activations, ForwardCtx, Layer};
use crate::layers::parameter::{Param, ParamBuilder};
use candle_core::{bail, Result};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

type Shared = Arc<dyn Any + Send + Sync>;
type BuildLayer<'a> = Box<dyn Fn(&ParamBuilder) -> Result<Box<dyn Layer>> + 'a>;
type BuildShared<'a> = Box<dyn Fn(&ParamBuilder) -> Result<Shared> + 'a>;
type WrapShared<'a> = Box<dyn Fn(Shared, &ParamBuilder) -> Result<Box<dyn Layer>> + 'a>;

/// How to build one layer. `type_name` is what `type:REGEX` partitioning matches and
/// `num_params` what `parameters` partitioning balances (known from the config, so stages are cut
/// before anything is built).
pub struct LayerSpec<'a> {
    pub type_name: String,
    pub num_params: u64,
    build: BuildLayer<'a>,
}

impl<'a> LayerSpec<'a> {
    pub fn new<L: Layer + 'static>(
        type_name: impl Into<String>,
        num_params: u64,
        build: impl Fn(&ParamBuilder) -> Result<L> + 'a,
    ) -> Self {
        Self {
            type_name: type_name.into(),
            num_params,
            build: Box::new(move |pb| Ok(Box::new(build(pb)?) as Box<dyn Layer>)),
        }
    }
}

/// A layer built around a module shared under `key`: on a stage, the first spec with the key
/// builds the module (`build`), and every spec with the key turns it into its layer (`forward`,
/// which may add parameters of its own through the builder it gets).
pub struct TiedLayerSpec<'a> {
    pub key: String,
    pub type_name: String,
    pub num_params: u64,
    build: BuildShared<'a>,
    forward: WrapShared<'a>,
}

impl<'a> TiedLayerSpec<'a> {
    pub fn new<T, L>(
        key: impl Into<String>,
        type_name: impl Into<String>,
        num_params: u64,
        build: impl Fn(&ParamBuilder) -> Result<T> + 'a,
        forward: impl Fn(Arc<T>, &ParamBuilder) -> Result<L> + 'a,
    ) -> Self
    where
        T: Send + Sync + 'static,
        L: Layer + 'static,
    {
        let key = key.into();
        let k = key.clone();
        Self {
            key,
            type_name: type_name.into(),
            num_params,
            build: Box::new(move |pb| Ok(Arc::new(build(pb)?) as Shared)),
            forward: Box::new(move |shared, pb| {
                let module = shared.downcast::<T>().map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "TiedLayerSpec `{k}`: specs sharing the key build different module types"
                    ))
                })?;
                Ok(Box::new(forward(module, pb)?) as Box<dyn Layer>)
            }),
        }
    }
}

pub enum PipeSpec<'a> {
    Layer(LayerSpec<'a>),
    Tied(TiedLayerSpec<'a>),
}

impl PipeSpec<'_> {
    pub fn type_name(&self) -> &str {
        match self {
            Self::Layer(s) => &s.type_name,
            Self::Tied(s) => &s.type_name,
        }
    }

    pub fn num_params(&self) -> u64 {
        match self {
            Self::Layer(s) => s.num_params,
            Self::Tied(s) => s.num_params,
        }
    }

    pub fn tie_key(&self) -> Option<&str> {
        match self {
            Self::Layer(_) => None,
            Self::Tied(s) => Some(&s.key),
        }
    }
}

impl<'a> From<LayerSpec<'a>> for PipeSpec<'a> {
    fn from(s: LayerSpec<'a>) -> Self {
        Self::Layer(s)
    }
}

impl<'a> From<TiedLayerSpec<'a>> for PipeSpec<'a> {
    fn from(s: TiedLayerSpec<'a>) -> Self {
        Self::Tied(s)
    }
}

/// A layer that shares its module with other layers of the stage (the tied spec's first use).
pub struct SharedLayer<T>(pub Arc<T>);

impl<T: Layer> Layer for SharedLayer<T> {
    fn name(&self) -> String {
        self.0.name()
    }
    fn type_name(&self) -> String {
        self.0.type_name()
    }
    fn parameters(&self) -> Vec<&Param> {
        self.0.parameters()
    }
    fn forward(&self, x: &Activations, ctx: &ForwardCtx) -> Result<Activations> {
        self.0.forward(x, ctx)
    }
}

/// Stage boundaries (`stages + 1` of them) of `specs`, from the specs alone.
pub fn partition_specs(
    specs: &[PipeSpec],
    stages: usize,
    method: &PartitionMethod,
) -> Result<Vec<usize>> {
    let items: Vec<(String, u64)> = specs
        .iter()
        .map(|s| (s.type_name().to_string(), s.num_params()))
        .collect();
    partition_items(&items, stages, method)
}

/// The stages holding each tied key under the boundaries `bounds`.
pub fn tied_stages(specs: &[PipeSpec], bounds: &[usize]) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (stage, w) in bounds.windows(2).enumerate() {
        for s in &specs[w[0]..w[1]] {
            if let Some(k) = s.tie_key() {
                let v = out.entry(k.to_string()).or_default();
                if v.last() != Some(&stage) {
                    v.push(stage);
                }
            }
        }
    }
    out
}

/// One stage of a pipeline model: the layers `range` of the spec list, built.
pub struct PipelineModule {
    /// Indices of this stage's layers in the full list.
    pub range: Range<usize>,
    layers: Vec<Box<dyn Layer>>,
}

impl PipelineModule {
    /// Builds stage `stage` of `stages` cut by `method`. The engine sums tied gradients between
    /// the first and the last stage, so a tied key used elsewhere is refused.
    pub fn new(
        specs: &[PipeSpec],
        stages: usize,
        stage: usize,
        method: &PartitionMethod,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        if stage >= stages {
            bail!("pipeline stage {stage} of {stages}")
        }
        let bounds = partition_specs(specs, stages, method)?;
        for (key, on) in tied_stages(specs, &bounds) {
            if on.iter().any(|&s| s != 0 && s + 1 != stages) {
                bail!(
                    "TiedLayerSpec `{key}` has layers on stages {on:?}: tied modules may only \
                     span the first and last stage"
                )
            }
        }
        Self::build(specs, bounds[stage]..bounds[stage + 1], pb)
    }

    /// Builds the layers `range` of `specs` (nothing else is built or read).
    pub fn build(specs: &[PipeSpec], range: Range<usize>, pb: &ParamBuilder) -> Result<Self> {
        if range.start >= range.end || range.end > specs.len() {
            bail!("stage layers {range:?} outside 0..{}", specs.len())
        }
        let mut shared: HashMap<String, Shared> = HashMap::new();
        let mut layers = Vec::with_capacity(range.len());
        for spec in &specs[range.clone()] {
            let layer = match spec {
                PipeSpec::Layer(s) => (s.build)(pb)?,
                PipeSpec::Tied(s) => {
                    let module = match shared.get(&s.key) {
                        Some(m) => m.clone(),
                        None => {
                            let m = (s.build)(pb)?;
                            shared.insert(s.key.clone(), m.clone());
                            m
                        }
                    };
                    let layer = (s.forward)(module, pb)?;
                    if !layer
                        .parameters()
                        .iter()
                        .any(|p| p.meta.tie_group.as_deref() == Some(s.key.as_str()))
                    {
                        bail!(
                            "TiedLayerSpec `{}` ({}): none of the layer's parameters has \
                             tie_group `{}`, so its gradient would not be shared",
                            s.key,
                            s.type_name,
                            s.key
                        )
                    }
                    layer
                }
            };
            layers.push(layer);
        }
        Ok(Self { range, layers })
    }

    /// This stage's layers, in order.
    pub fn layers(&self) -> Vec<&dyn Layer> {
        self.layers.iter().map(|l| l.as_ref()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::init::RandomInit;
    use crate::layers::parameter::{Init, ParamOpts};
    use candle_core::{DType, Device};
    use std::cell::Cell;

    /// A layer owning one `[2, 2]` weight (optionally tied), or reusing a shared one.
    struct Toy {
        name: String,
        w: Param,
    }

    impl Layer for Toy {
        fn name(&self) -> String {
            self.name.clone()
        }
        fn parameters(&self) -> Vec<&Param> {
            vec![&self.w]
        }
        fn forward(&self, x: &Activations, _: &ForwardCtx) -> Result<Activations> {
            Ok(Activations::new(x.hidden.matmul(self.w.tensor())?))
        }
    }

    fn toy(pb: &ParamBuilder, name: &str, tie: Option<&str>) -> Result<Toy> {
        let w = pb.get(
            &[2, 2],
            &format!("{name}.weight"),
            Init::Normal { std: 1.0 },
            ParamOpts {
                tie_group: tie.map(String::from),
                ..Default::default()
            },
        )?;
        Ok(Toy {
            name: name.into(),
            w,
        })
    }

    /// [tied embed, 4 blocks, tied head]; counts how many layers each stage builds.
    fn specs<'a>(built: &'a Cell<usize>, tie: Option<&'a str>) -> Vec<PipeSpec<'a>> {
        let mut v: Vec<PipeSpec> = vec![TiedLayerSpec::new(
            "embed",
            "Embed",
            10,
            move |pb| {
                built.set(built.get() + 1);
                toy(pb, "embed", tie)
            },
            |m, _| Ok(SharedLayer(m)),
        )
        .into()];
        for i in 0..4 {
            v.push(
                LayerSpec::new("Block", 4, move |pb| {
                    built.set(built.get() + 1);
                    toy(pb, &format!("layers.{i}"), None)
                })
                .into(),
            );
        }
        v.push(
            TiedLayerSpec::new(
                "embed",
                "Head",
                10,
                move |pb| {
                    built.set(built.get() + 1);
                    toy(pb, "embed", tie)
                },
                |m: Arc<Toy>, _| {
                    Ok(Toy {
                        name: "head".into(),
                        w: m.w.clone(),
                    })
                },
            )
            .into(),
        );
        v
    }

    #[test]
    fn a_stage_builds_only_its_layers_and_tied_modules_once() {
        let src = RandomInit { seed: 1 };
        let pb = ParamBuilder::new(&src, &Device::Cpu, DType::F32);
        let built = Cell::new(0);
        let s = specs(&built, Some("embed"));
        let bounds = partition_specs(&s, 2, &PartitionMethod::Uniform).unwrap();
        assert_eq!(bounds, vec![0, 3, 6]);
        assert_eq!(
            tied_stages(&s, &bounds).get("embed"),
            Some(&vec![0usize, 1])
        );
        let last = PipelineModule::new(&s, 2, 1, &PartitionMethod::Uniform, &pb).unwrap();
        assert_eq!(built.get(), 3); // layers.2, layers.3 and the tied module
        let names: Vec<String> = last.layers().iter().map(|l| l.name()).collect();
        assert_eq!(names, ["layers.2", "layers.3", "head"]);
        // One stage holding both ends builds the tied module once and shares its parameter.
        built.set(0);
        let whole = PipelineModule::new(&s, 1, 0, &PartitionMethod::Uniform, &pb).unwrap();
        assert_eq!(built.get(), 5);
        let layers = whole.layers();
        assert_eq!(
            layers[0].parameters()[0].var.as_tensor().id(),
            layers[5].parameters()[0].var.as_tensor().id()
        );
        // The copy on another stage is the same initial value (built from the same name).
        let a = whole.layers()[5].parameters()[0]
            .tensor()
            .to_vec2::<f32>()
            .unwrap();
        let b = last.layers()[2].parameters()[0]
            .tensor()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b);
        // `parameters` and `type:` partitioning use the specs' counts and names.
        assert_eq!(
            partition_specs(&s, 2, &PartitionMethod::Parameters).unwrap(),
            vec![0, 3, 6]
        );
        let by_type = partition_specs(&s, 3, &"type:block".parse().unwrap()).unwrap();
        assert_eq!(by_type, vec![0, 3, 5, 6]);
    }

    #[test]
    fn tied_specs_are_checked() {
        let src = RandomInit { seed: 1 };
        let pb = ParamBuilder::new(&src, &Device::Cpu, DType::F32);
        let built = Cell::new(0);
        // Without tie_group on the shared weight the gradients would never be summed.
        let untied = specs(&built, None);
        let e = PipelineModule::new(&untied, 2, 0, &PartitionMethod::Uniform, &pb)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tie_group `embed`"), "{e}");
        // A tied layer on a middle stage is refused.
        let mut s = specs(&built, Some("embed"));
        s.swap(2, 5);
        let e = PipelineModule::new(&s, 3, 0, &PartitionMethod::Uniform, &pb)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("first and last stage"), "{e}");
    }
}
