fn main() { let _ = tch::Tensor::from_slice(&[1.0f32]); let _ = good_lp::variables!(); println!("ok"); }
