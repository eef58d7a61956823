"""Zero-shot knowledge transfer (Micaelli & Storkey, NeurIPS 2019): a generator trained
adversarially against the student supplies the student's training inputs.

One compiled call is one round of the game, on the device:
  1. the generator G takes one Adam step to *maximise* the student's disagreement with the
     teacher on its images, loss_G = -KL(T(G(z)) ‖ S(G(z))) [+ bn_weight · the teacher's
     BatchNorm-statistics loss of DeepInversion, + balance_weight · DAFL's information-entropy
     term -H(mean_batch softmax T(G(z))), both 0 in pure ZSKT];
  2. the student takes `student_steps` steps to minimise T²·KL(T(x) ‖ S(x)) at the loss's
     temperature on fresh images x = G(z') (no gradient into G).
The teacher is frozen and in inference mode throughout; gradients flow through it into G only.
ZSKT's attention-transfer term between teacher and student feature maps is not included.

The generator is DAFL's (Chen et al., ICCV 2019) image generator, narrower: z -> linear ->
(H/4 x W/4 x c₁) -> BN -> [2x nearest upsampling -> 3x3 conv -> BN -> LeakyReLU(0.2)] x 2
(c₁, then c₂ channels) -> 3x3 conv to the image's channels -> tanh -> BN without affine, so its
images are per-channel standardised, as the teacher's normalised inputs are.
"""

from __future__ import annotations

from collections.abc import Sequence
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from kdjax import losses, sharding
from kdjax.datafree import bn_stats
from kdjax.step import FrozenModel, TrainState


class Generator(nnx.Module):
    """z [B, latent_dim] -> images [B, H, W, C] in the teacher's normalised input space."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int],
                 channels: Sequence[int] = (64, 32), *, rngs: nnx.Rngs):
        h, w, c = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"the generator upsamples twice by 2: image height and width must "
                             f"be multiples of 4, got {tuple(image_shape)}")
        c1, c2 = channels
        self.start = (h // 4, w // 4, c1)
        self.fc = nnx.Linear(latent_dim, h // 4 * (w // 4) * c1, rngs=rngs)
        self.bn0 = nnx.BatchNorm(c1, momentum=0.9, rngs=rngs)
        self.conv1 = nnx.Conv(c1, c1, (3, 3), padding=1, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c1, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), padding=1, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c2, momentum=0.9, rngs=rngs)
        self.conv3 = nnx.Conv(c2, c, (3, 3), padding=1, rngs=rngs)
        self.bn_out = nnx.BatchNorm(c, use_scale=False, use_bias=False, momentum=0.9, rngs=rngs)

    def __call__(self, z: jax.Array, *, train: bool = True) -> jax.Array:
        ura = not train

        def up(x):
            return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

        x = self.bn0(self.fc(z).reshape(z.shape[0], *self.start), use_running_average=ura)
        x = nnx.leaky_relu(self.bn1(self.conv1(up(x)), use_running_average=ura), 0.2)
        x = nnx.leaky_relu(self.bn2(self.conv2(up(x)), use_running_average=ura), 0.2)
        return self.bn_out(jnp.tanh(self.conv3(x)), use_running_average=ura)


class GameState(flax.struct.PyTreeNode):
    """The student's TrainState (as kdjax.trainer checkpoints it) and the generator's state."""

    student: TrainState
    generator_params: nnx.State
    generator_stats: nnx.State
    generator_opt: optax.OptState


def init_generator(generator: Generator, tx: optax.GradientTransformation
                   ) -> tuple[nnx.GraphDef, nnx.State, nnx.State, optax.OptState]:
    graphdef, params, stats = nnx.split(generator, nnx.Param, ...)
    return graphdef, params, stats, tx.init(params)


def balance_loss(teacher_logits: jax.Array) -> jax.Array:
    """DAFL's information-entropy term: -H(mean_b softmax(logits_b)), lowest for a batch whose
    predicted classes are balanced."""
    mean = jax.nn.softmax(teacher_logits, -1).mean(0)
    return jnp.sum(mean * jnp.log(mean + 1e-12))


def make_game_step(student_graphdef: nnx.GraphDef, student_tx: optax.GradientTransformation,
                   generator_graphdef: nnx.GraphDef, generator_tx: optax.GradientTransformation,
                   teacher: FrozenModel, *, batch_size: int, latent_dim: int,
                   student_steps: int, temperature: float = 1.0, bn_weight: float = 0.0,
                   balance_weight: float = 0.0, mesh: Mesh | None = None):
    """`step(state, teacher_variables) -> (state, metrics)`: one round (see the module
    docstring), jitted with the state donated and replicated on `mesh` (default: all devices),
    the generated batch split over its devices. `state.student.step` counts student steps."""
    mesh = mesh or sharding.make_mesh()
    rep = sharding.replicated(mesh)

    def generate(params, stats, key, train=True):
        gen = nnx.merge(generator_graphdef, params, stats, copy=True)
        z = jax.lax.with_sharding_constraint(jax.random.normal(key, (batch_size, latent_dim)),
                                             sharding.batch_sharded(mesh))
        return gen(z, train=train), gen

    def kl(student_logits, teacher_logits):
        return losses.soft_target_kl(student_logits, teacher_logits,
                                     temperature=temperature).mean()

    def step(state: GameState, teacher_vars):
        st = state.student
        key = jax.random.fold_in(jax.random.wrap_key_data(st.rng), st.step)
        student = nnx.merge(student_graphdef, st.params, st.model_state)

        # 1. the generator's move: make the student disagree with the teacher
        def generator_loss(params):
            x, gen = generate(params, state.generator_stats, jax.random.fold_in(key, 0))
            model = nnx.merge(teacher.graphdef, teacher_vars)
            if bn_weight:
                with bn_stats.recording(model) as records:
                    t = model(x, train=False).astype(jnp.float32)
                bn = bn_stats.statistics_loss(records)
            else:
                t, bn = model(x, train=False).astype(jnp.float32), jnp.zeros(())
            s = student(x, train=False).astype(jnp.float32)
            adversarial = kl(s, t)
            balance = balance_loss(t)
            loss = -adversarial + bn_weight * bn + balance_weight * balance
            return loss, (nnx.state(gen, nnx.Not(nnx.Param)),
                          {"generator/kl": adversarial, "generator/bn": bn,
                           "generator/balance": balance})

        (_, (g_stats, metrics)), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(
            state.generator_params)
        g_updates, g_opt = generator_tx.update(g_grads, state.generator_opt,
                                               state.generator_params)
        g_params = optax.apply_updates(state.generator_params, g_updates)

        # 2. the student's moves: match the teacher on fresh generated images
        # (a Python loop, unrolled: XLA:CPU runs convolutions in loop bodies slowly)
        params, model_state, opt_state = st.params, st.model_state, st.opt_state
        for i in range(student_steps):
            x, _ = generate(g_params, g_stats, jax.random.fold_in(key, i + 1))
            x = jax.lax.stop_gradient(x)
            t = jax.lax.stop_gradient(
                nnx.merge(teacher.graphdef, teacher_vars)(x, train=False).astype(jnp.float32))

            def student_loss(p):
                model = nnx.merge(student_graphdef, p, model_state, copy=True)
                s = model(x, train=True).astype(jnp.float32)
                return kl(s, t), (nnx.state(model, nnx.Not(nnx.Param)),
                                  (s.argmax(-1) == t.argmax(-1)).mean())

            (loss, (model_state, agree)), grads = jax.value_and_grad(
                student_loss, has_aux=True)(params)
            updates, opt_state = student_tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        metrics.update({"kd": loss, "teacher_agreement": agree})
        student_state = st.replace(step=st.step + student_steps, params=params,
                                   model_state=model_state, opt_state=opt_state)
        return state.replace(student=student_state, generator_params=g_params,
                             generator_stats=g_stats, generator_opt=g_opt), metrics

    return jax.jit(step, donate_argnums=0, in_shardings=rep, out_shardings=rep)


def sample_images(generator_graphdef: nnx.GraphDef, state: GameState, key: jax.Array,
                  num: int, latent_dim: int) -> jax.Array:
    """`num` images from the generator as it is (batch statistics, as in training)."""

    @jax.jit
    def sample(params, stats, key):
        gen = nnx.merge(generator_graphdef, params, stats, copy=True)
        return gen(jax.random.normal(key, (num, latent_dim)), train=True)

    return sample(state.generator_params, state.generator_stats, key)
