//! Temporary naive kernels.
use crate::dtype::WeightDtype;
use half::bf16;
pub struct Matrix {
    rows: usize,
    cols: usize,
    f: Option<Vec<f32>>,
    b: Option<Vec<bf16>>,
}
impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>, dtype: WeightDtype) -> Self {
        match dtype {
            WeightDtype::F32 => Matrix {
                rows,
                cols,
                f: Some(data),
                b: None,
            },
            WeightDtype::Bf16 => Matrix {
                rows,
                cols,
                f: None,
                b: Some(data.iter().map(|&v| bf16::from_f32(v)).collect()),
            },
        }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn size_bytes(&self) -> usize {
        self.rows * self.cols * if self.f.is_some() { 4 } else { 2 }
    }
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        if let Some(f) = &self.f {
            out.copy_from_slice(&f[r * c..(r + 1) * c])
        } else {
            for (o, v) in out
                .iter_mut()
                .zip(&self.b.as_ref().unwrap()[r * c..(r + 1) * c])
            {
                *o = v.to_f32()
            }
        }
    }
}
pub fn linear(x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let mut row = vec![0f32; w.cols];
    for n in 0..w.rows {
        w.row_to_f32(n, &mut row);
        for i in 0..m {
            let xr = &x[i * w.cols..(i + 1) * w.cols];
            out[i * w.rows + n] =
                xr.iter().zip(&row).map(|(a, b)| a * b).sum::<f32>() + bias.map_or(0.0, |b| b[n]);
        }
    }
}
