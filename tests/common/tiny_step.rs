//! The built-in tiny U-Net with a registered method attached, and one training step's inputs: the
//! step-level fixture of the precision and checkpointing tests.
use difftune::model::tiny;
use difftune::model::unet::{UNet2DConditionModel, UNetConfig};
use difftune::peft::MethodSettings;
use difftune::peft::Tuned;
use difftune::schedulers::SchedulerConfig;
use difftune::train::config::TrainConfig;
use difftune::train::step::{
    attach_method, forward_backward, lay_out_for_training, Objective, StepInputs,
};
use tch::{nn, Device, Kind, Tensor};

pub struct TinyStep {
    #[allow(dead_code)] // read by the precision tests only
    pub vs: nn::VarStore,
    pub unet: UNet2DConditionModel,
    pub tuned: Tuned,
    pub objective: Objective,
    pub inputs: StepInputs,
    /// Whether frozen weights are stored in bf16 and the step runs under bf16 autocast.
    pub bf16: bool,
}

impl TinyStep {
    /// `method` on the tiny U-Net, its zero-initialised trained tensors (LoRA's up-projection,
    /// adapters' output) moved off zero so that the method's own computation shows in the output.
    pub fn new(method: &str, bf16: bool) -> Self {
        tch::manual_seed(0);
        let config: UNetConfig = serde_json::from_value(tiny::unet_config()).unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let mut unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
        let method = MethodSettings::defaults(method).unwrap();
        let tuned = attach_method(&mut unet, &mut vs, &method, 0).unwrap();
        tch::manual_seed(1);
        tch::no_grad(|| {
            for (_, t) in &tuned.trained {
                if t.abs().max().double_value(&[]) == 0.0 {
                    let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.05));
                }
            }
        });
        // As a bf16 training run lays the model out (the standard memory layout).
        lay_out_for_training(&vs, &tuned, bf16, false);
        let scheduler = SchedulerConfig::from_json(&tiny::scheduler_config().to_string()).unwrap();
        let objective = Objective::new(&scheduler, &TrainConfig::default()).unwrap();
        let latents = Tensor::randn([2, config.in_channels, 8, 8], (Kind::Float, Device::Cpu));
        let (noise, timesteps) = objective.draw(&latents).unwrap();
        let inputs = StepInputs {
            latents,
            conditioning: (&Tensor::randn(
                [2, 7, config.cross_attention_dim],
                (Kind::Float, Device::Cpu),
            ))
                .into(),
            noise,
            timesteps,
        };
        Self {
            vs,
            unet,
            tuned,
            objective,
            inputs,
            bf16,
        }
    }

    /// One forward-backward of the fixed inputs: the loss and every trained tensor's gradient.
    pub fn loss_and_grads(&self) -> (Tensor, Vec<Tensor>) {
        for (_, t) in &self.tuned.trained {
            let mut grad = t.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
        let loss =
            forward_backward(&self.unet, &self.objective, &self.inputs, self.bf16, 1.0).unwrap();
        let grads = self
            .tuned
            .trained
            .iter()
            .map(|(_, t)| t.grad().copy())
            .collect();
        (loss, grads)
    }
}

#[allow(dead_code)] // used by the precision tests only
pub fn trainable(tuned: &Tuned) -> Vec<Tensor> {
    tuned
        .trained
        .iter()
        .map(|(_, t)| t.shallow_clone())
        .collect()
}
