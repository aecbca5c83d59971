//! A small Dockerfile reader: instructions (continuation lines joined, comments dropped) grouped
//! into build stages. Enough to check what each stage runs and copies; not a full parser (no
//! heredocs, no escape directive other than the default backslash).

#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    #[error("line {line}: `{instruction}` before the first FROM")]
    BeforeFrom { line: usize, instruction: String },
    #[error("line {line}: FROM without an image")]
    EmptyFrom { line: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line where the instruction starts.
    pub line: usize,
    /// Upper-cased keyword: RUN, COPY, FROM, ...
    pub keyword: String,
    /// Everything after the keyword, continuation lines joined with a space.
    pub args: String,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub image: String,
    /// `AS name`, when given.
    pub name: Option<String>,
    pub instructions: Vec<Instruction>,
}

impl Stage {
    pub fn with_keyword<'a>(&'a self, keyword: &'a str) -> impl Iterator<Item = &'a Instruction> {
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
    }
}

#[derive(Debug, Clone)]
pub struct Dockerfile {
    /// ARGs before the first FROM (they parameterise FROM lines).
    pub global_args: Vec<Instruction>,
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    pub fn parse(text: &str) -> Result<Dockerfile, DockerfileError> {
        let mut global_args = Vec::new();
        let mut stages: Vec<Stage> = Vec::new();
        for ins in instructions(text) {
            if ins.keyword == "FROM" {
                let mut words = ins.args.split_whitespace().filter(|w| !w.starts_with("--"));
                let image = words
                    .next()
                    .ok_or(DockerfileError::EmptyFrom { line: ins.line })?
                    .to_owned();
                let name = match (words.next(), words.next()) {
                    (Some(kw), Some(n)) if kw.eq_ignore_ascii_case("as") => Some(n.to_owned()),
                    _ => None,
                };
                stages.push(Stage {
                    image,
                    name,
                    instructions: Vec::new(),
                });
                continue;
            }
            match stages.last_mut() {
                Some(stage) => stage.instructions.push(ins),
                None if ins.keyword == "ARG" => global_args.push(ins),
                None => {
                    return Err(DockerfileError::BeforeFrom {
                        line: ins.line,
                        instruction: ins.keyword,
                    });
                }
            }
        }
        Ok(Dockerfile {
            global_args,
            stages,
        })
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name.as_deref() == Some(name))
    }
}

/// Splits the text into instructions: comment lines (also inside a continued instruction) are
/// dropped, a trailing backslash continues the instruction on the next line.
fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_none()) {
            continue;
        }
        let (body, continues) = match line.strip_suffix('\\') {
            Some(b) => (b.trim_end(), true),
            None => (line, false),
        };
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        if !acc.is_empty() && !body.is_empty() {
            acc.push(' ');
        }
        acc.push_str(body);
        if continues {
            pending = Some((start, acc));
            continue;
        }
        if let Some(ins) = split_keyword(start, &acc) {
            out.push(ins);
        }
    }
    if let Some((start, acc)) = pending
        && let Some(ins) = split_keyword(start, &acc)
    {
        out.push(ins);
    }
    out
}

fn split_keyword(line: usize, text: &str) -> Option<Instruction> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let (kw, args) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    Some(Instruction {
        line,
        keyword: kw.to_ascii_uppercase(),
        args: args.trim().to_owned(),
    })
}

/// The shell commands of a RUN instruction, split on `&&`, `;` and newlines, with RUN flags
/// (`--mount=...`) removed.
pub fn run_commands(ins: &Instruction) -> Vec<String> {
    let mut words: Vec<&str> = ins.args.split_whitespace().collect();
    while words.first().is_some_and(|w| w.starts_with("--")) {
        words.remove(0);
    }
    words
        .join(" ")
        .split("&&")
        .flat_map(|c| c.split(';'))
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_continuations_and_comments() {
        let df = Dockerfile::parse(
            "# syntax=docker/dockerfile:1\nARG X=1\nFROM a:1 AS build\nRUN one \\\n  # inner comment\n  && two\n\nFROM --platform=linux/amd64 b AS run\nCOPY --from=build /o /p\nENTRYPOINT [\"/p\"]\n",
        )
        .unwrap();
        assert_eq!(df.global_args.len(), 1);
        assert_eq!(df.stages.len(), 2);
        let build = df.stage("build").unwrap();
        assert_eq!(build.image, "a:1");
        let run: Vec<_> = build.with_keyword("RUN").collect();
        assert_eq!(run.len(), 1);
        assert_eq!(run[0].line, 4);
        assert_eq!(run_commands(run[0]), ["one", "two"]);
        let rt = df.stage("run").unwrap();
        assert_eq!(rt.image, "b");
        assert_eq!(
            rt.with_keyword("COPY").next().unwrap().args,
            "--from=build /o /p"
        );
        assert!(Dockerfile::parse("RUN x\n").is_err());
    }
}
