//! What `inspect` reads of one image file: its size and channels from the header (or from
//! decoding it), and whether a PNG or JPEG file ends with its end marker.

use std::path::Path;

use super::InspectDepth;

/// What [`image_info`] learns about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ImageInfo {
    pub(super) width: u32,
    pub(super) height: u32,
    pub(super) channels: u8,
    /// Something suspicious that does not stop the file from being read.
    pub(super) warning: Option<String>,
}

/// Size and channels of an image, from its header or, with [`InspectDepth::Decode`], from
/// decoding it; an error message when it cannot be read.
pub(super) fn image_info(
    path: &Path,
    depth: InspectDepth,
) -> std::result::Result<ImageInfo, String> {
    // With train's size limits: a header that claims more is an error here as there.
    let reader = crate::data::folder::open_image(path).map_err(|e| e.to_string())?;
    let format = reader.format();
    if depth == InspectDepth::Decode {
        let image = reader.decode().map_err(|e| e.to_string())?;
        return Ok(ImageInfo {
            width: image.width(),
            height: image.height(),
            channels: image.color().channel_count(),
            warning: None,
        });
    }
    let decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    let channels = image::ImageDecoder::color_type(&decoder).channel_count();
    let warning = match format {
        Some(image::ImageFormat::Png) if !tail_contains(path, b"IEND")? => {
            return Err("truncated: the PNG end chunk (IEND) is missing".to_string());
        }
        Some(image::ImageFormat::Jpeg) if !tail_contains(path, &[0xFF, 0xD9])? => Some(
            "the JPEG end marker is missing: truncated? (inspect with full decoding to be sure)"
                .to_string(),
        ),
        _ => None,
    };
    Ok(ImageInfo {
        width,
        height,
        channels,
        warning,
    })
}

/// Whether the last kilobyte of the file holds `marker` (an end chunk or marker: files cut
/// short lose it; a few bytes of padding after it are allowed).
fn tail_contains(path: &Path, marker: &[u8]) -> std::result::Result<bool, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let start = len.saturating_sub(1024);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    let mut tail = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut tail).map_err(|e| e.to_string())?;
    Ok(tail.windows(marker.len()).any(|w| w == marker))
}
